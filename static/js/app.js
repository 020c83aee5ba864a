// Tiny progressive enhancements; everything works without this file.
(function () {
  "use strict";
  function showToast(detail) {
    var box = document.getElementById("toasts");
    if (!box || !detail) return;
    var el = document.createElement("div");
    var level = ["success", "error", "info", "warning"].indexOf(detail.level) >= 0 ? detail.level : "info";
    el.className = "toast toast-" + level;
    el.textContent = detail.message || "";
    box.appendChild(el);
    setTimeout(function () { el.classList.add("toast-leave"); }, 3500);
    setTimeout(function () { el.remove(); }, 4000);
  }
  document.body.addEventListener("toast", function (e) { showToast(e.detail); });
  // Flashed messages rendered by the server fade out too.
  document.querySelectorAll("#toasts .toast").forEach(function (el) {
    setTimeout(function () { el.classList.add("toast-leave"); }, 5000);
    setTimeout(function () { el.remove(); }, 5500);
  });
  // Copy buttons: <button data-copy="#element-id">.
  document.body.addEventListener("click", function (e) {
    var btn = e.target.closest("[data-copy]");
    if (!btn) return;
    var src = document.querySelector(btn.getAttribute("data-copy"));
    if (!src || !navigator.clipboard) return;
    navigator.clipboard.writeText(src.textContent.trim()).then(function () {
      showToast({ message: "Copied", level: "success" });
    });
  });
})();
