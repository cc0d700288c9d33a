/* formrelay: move focus to what needs attention, and tell an embedding page our height. */
(function () {
  "use strict";
  var target = document.getElementById("error-summary") || document.getElementById("banner") ||
    document.getElementById("thanks-title");
  if (target) { target.focus(); }
  if (window.parent === window) { return; }
  var last = 0;
  function report() {
    var height = Math.ceil(document.documentElement.getBoundingClientRect().height);
    if (height !== last) {
      last = height;
      // Only a height is sent, never form content, so any embedding origin may read it.
      window.parent.postMessage({ type: "formrelay:height", height: height }, "*");
    }
  }
  report();
  window.addEventListener("load", report);
  if (window.ResizeObserver) { new ResizeObserver(report).observe(document.documentElement); }
  else { window.setInterval(report, 500); }
})();
