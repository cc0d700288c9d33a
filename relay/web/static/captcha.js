/* formrelay: load the hCaptcha widget; when it cannot load, say so and offer to try again. */
(function () {
  "use strict";
  var box = document.querySelector(".h-captcha[data-script]");
  var notice = document.getElementById("captcha-unavailable");
  var retry = document.getElementById("captcha-retry");
  if (!box || !notice) { return; }
  // A script that never answers (a proxy holding the request) counts as failed after this.
  var PATIENCE_MS = 15000;
  var attempt = 0;

  // Not just window.hcaptcha: the field's id="hcaptcha" makes that the element itself.
  function loaded() {
    return Boolean(window.hcaptcha && typeof window.hcaptcha.render === "function");
  }

  function unavailable(which) {
    if (which !== attempt || loaded()) { return; }
    box.hidden = true;  // no empty widget-sized gap under the label
    notice.hidden = false;
  }

  function load() {
    attempt += 1;
    var which = attempt;
    box.hidden = false;
    notice.hidden = true;
    var script = document.createElement("script");
    script.src = box.dataset.script;
    script.async = true;
    // The script defines window.hcaptcha; a proxy's error page answered with 200 does not.
    script.addEventListener("load", function () {
      if (!loaded()) { unavailable(which); return; }
      box.hidden = false;  // it may have come after PATIENCE_MS
      notice.hidden = true;
    });
    script.addEventListener("error", function () { unavailable(which); });
    window.setTimeout(function () { unavailable(which); }, PATIENCE_MS);
    document.head.appendChild(script);
  }

  if (retry) {
    retry.addEventListener("click", function (event) {
      // Load it again in place: a reload would lose what the visitor typed.
      event.preventDefault();
      load();
    });
  }
  load();
})();
