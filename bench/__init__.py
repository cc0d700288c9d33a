"""formrelay's benchmark harness (`bench/run`): accept, end to end, drain, sign, memory."""
