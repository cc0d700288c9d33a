"""An aiosmtpd server in a thread with its own event loop, on an ephemeral loopback port.

The demo's support mailbox and the tests' scripted MX peers both need a real SMTP server that
runs beside synchronous code (the demo's main thread, a pytest test) and stops cleanly;
subclasses say which SMTP protocol object serves each connection.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Self

from aiosmtpd.smtp import SMTP


class ThreadedSMTPServer:
    thread_name = "smtp-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port: the one asked for, or the ephemeral one chosen for port 0."""
        return self._port

    def _factory(self) -> SMTP:
        raise NotImplementedError

    def start(self) -> Self:
        ready = threading.Event()
        errors: list[BaseException] = []
        connections: weakref.WeakSet[SMTP] = weakref.WeakSet()

        def factory() -> SMTP:
            protocol = self._factory()
            connections.add(protocol)
            return protocol

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                server = loop.run_until_complete(loop.create_server(factory, self.host, self._port))
                self._port = int(server.sockets[0].getsockname()[1])
            except OSError as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            # A client may still hold a session open (relay.smtp keeps idle ones for the next
            # message): close it here, or its transport outlives the loop.
            for protocol in list(connections):
                if isinstance(protocol.transport, asyncio.Transport):
                    protocol.transport.abort()
            server.close()
            loop.run_until_complete(server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=self.thread_name)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
