/* formrelay embed: <script src="https://forms.example.com/embed.js" async></script>
 * Optional attributes: data-form (a form's id from RELAY_FORMS_FILE, served at /f/<id>, or a
 * path or URL of a form on the same origin; default /form), data-lang (en or ja), data-title
 * (the iframe's accessible name).
 * Inserts the form in an iframe right after this script and keeps the iframe as tall as its
 * content, trusting height messages only from the form's own origin and frame. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.src) { return; }
  var base = new URL(script.src);
  var form = script.getAttribute("data-form") || "/form";
  if (/^[a-z0-9][a-z0-9_-]{0,39}$/.test(form)) { form = "/f/" + form; }
  var url = new URL(form, base);
  if (url.origin !== base.origin) {
    if (window.console) { window.console.error("formrelay: data-form must be on " + base.origin); }
    return;
  }
  url.searchParams.set("embed", "1");
  var lang = script.getAttribute("data-lang");
  if (lang) { url.searchParams.set("lang", lang); }
  var frame = document.createElement("iframe");
  frame.src = url.href;
  frame.title = script.getAttribute("data-title") || "Contact form";
  frame.setAttribute("scrolling", "no");
  frame.style.cssText = "display:block;width:100%;max-width:40rem;height:40rem;border:0;overflow:hidden";
  script.parentNode.insertBefore(frame, script.nextSibling);
  window.addEventListener("message", function (event) {
    if (event.origin !== base.origin || event.source !== frame.contentWindow) { return; }
    var data = event.data;
    if (!data || data.type !== "formrelay:height") { return; }
    var height = Number(data.height);
    if (isFinite(height) && height > 0 && height < 100000) {
      frame.style.height = Math.ceil(height) + "px";
    }
  });
})();
