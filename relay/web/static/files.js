/* formrelay: list the files picked for upload with their sizes before sending, and say at
 * once when one is too big (the server checks again; this spares a long upload). */
(function () {
  "use strict";
  function size(bytes) {
    if (bytes < 1000) { return bytes + " B"; }
    if (bytes < 1000000) { return Math.round(bytes / 1000) + " kB"; }
    return (bytes / 1000000).toFixed(1) + " MB";
  }
  function fill(text, values) {
    return text.replace(/\{(\w+)\}/g, function (_, key) { return values[key]; });
  }
  function problems(input) {
    var found = [], total = 0, files = input.files || [];
    var each = Number(input.dataset.maxFileBytes), all = Number(input.dataset.maxTotalBytes);
    for (var i = 0; i < files.length; i += 1) {
      total += files[i].size;
      if (files[i].size > each) {
        found.push(fill(input.dataset.tooBig, {name: files[i].name, size: size(files[i].size), max: size(each)}));
      }
    }
    if (files.length > Number(input.dataset.maxFiles)) { found.push(input.dataset.tooMany); }
    if (total > all) { found.push(fill(input.dataset.tooLargeTogether, {size: size(total), max: size(all)})); }
    return found;
  }
  function show(input) {
    var list = document.getElementById(input.id + "-list");
    var files = input.files || [];
    list.textContent = "";
    list.hidden = files.length === 0;
    list.setAttribute("aria-label", input.dataset.listLabel);
    for (var i = 0; i < files.length; i += 1) {
      var item = document.createElement("li");
      item.textContent = files[i].name + " (" + size(files[i].size) + ")";
      list.appendChild(item);
    }
    problems(input).forEach(function (text) {
      var item = document.createElement("li");
      item.className = "too-big";
      item.setAttribute("role", "alert");
      item.textContent = text;
      list.appendChild(item);
    });
  }
  var inputs = document.querySelectorAll("input[type=file][data-max-file-bytes]");
  Array.prototype.forEach.call(inputs, function (input) {
    input.addEventListener("change", function () { show(input); });
    input.form.addEventListener("submit", function (event) {
      if (problems(input).length) {
        event.preventDefault();
        show(input);
        input.focus();
      }
    });
  });
})();
