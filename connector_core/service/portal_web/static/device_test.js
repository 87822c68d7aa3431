// The patient's device check (inlined with a nonce): camera preview, microphone level and a
// speaker tone, all local. The page's CSP allows no connections, so nothing can be sent.
(function () {
  "use strict";
  // The base template puts this script at the end of <body>: the page is parsed.
  var root = document.getElementById("device-test");
  if (!root) { return; }
  var text = JSON.parse(root.getAttribute("data-results") || "{}");
  var stream = null, audio = null, heard = false;

  function result(id, state, message) {
    var el = document.getElementById(id);
    el.setAttribute("data-state", state);
    el.textContent = message;
  }
  function stop() {
    if (stream) { stream.getTracks().forEach(function (t) { t.stop(); }); stream = null; }
  }
  window.addEventListener("pagehide", stop);

  function meter(s) {
    var Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) { return; }
    audio = audio || new Ctx();
    var analyser = audio.createAnalyser();
    analyser.fftSize = 1024;
    audio.createMediaStreamSource(s).connect(analyser);  // analysed only, never played or sent
    var data = new Float32Array(analyser.fftSize);
    var level = document.getElementById("level");
    (function tick() {
      if (!stream) { return; }
      analyser.getFloatTimeDomainData(data);
      var sum = 0;
      for (var i = 0; i < data.length; i++) { sum += data[i] * data[i]; }
      var rms = Math.min(1, Math.sqrt(sum / data.length) * 4);
      level.value = rms;
      if (rms > 0.02 && !heard) { heard = true; result("mic-result", "ok", text.micOk); }
      requestAnimationFrame(tick);
    })();
    setTimeout(function () { if (!heard && stream) { result("mic-result", "problem", text.micSilent); } }, 5000);
  }

  document.getElementById("start").addEventListener("click", function () {
    var permission = document.getElementById("permission");
    permission.hidden = true;
    stop();
    heard = false;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      permission.textContent = text.failed; permission.hidden = false; return;
    }
    navigator.mediaDevices.getUserMedia({ video: true, audio: true }).then(function (s) {
      stream = s;
      var video = document.getElementById("preview");
      video.srcObject = s;
      if (s.getVideoTracks().length) { result("camera-result", "ok", text.cameraOk); }
      if (s.getAudioTracks().length) { meter(s); }
      if (audio && audio.state === "suspended") { audio.resume(); }
    }, function (err) {
      var name = err && err.name;
      permission.textContent = name === "NotAllowedError" || name === "SecurityError" ? text.blocked
        : name === "NotFoundError" || name === "NotReadableError" ? text.missing : text.failed;
      permission.hidden = false;
      result("camera-result", "problem", permission.textContent);
      result("mic-result", "problem", permission.textContent);
    });
  });

  document.getElementById("tone").addEventListener("click", function () {
    var Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) { result("speaker-result", "problem", text.failed); return; }
    audio = audio || new Ctx();
    if (audio.state === "suspended") { audio.resume(); }
    var osc = audio.createOscillator(), gain = audio.createGain();
    osc.frequency.value = 440;
    gain.gain.value = 0.2;
    osc.connect(gain); gain.connect(audio.destination);
    osc.start(); osc.stop(audio.currentTime + 2);
    result("speaker-result", "pending", text.playing);
    document.getElementById("heard-question").hidden = false;
  });
  document.getElementById("heard-yes").addEventListener("click", function () { result("speaker-result", "ok", text.speakerOk); });
  document.getElementById("heard-no").addEventListener("click", function () { result("speaker-result", "problem", text.speakerNo); });
})();
