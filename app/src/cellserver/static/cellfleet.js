// The cell page: run the editor's code through /service, make permalinks through /permalink.
// The server puts the code of a ?z=, ?q= or ?c= link into #initial-cell, so links open with their code.
"use strict";

const editor = document.getElementById("code");
const output = document.getElementById("output");
const statusLine = document.getElementById("status");
const languageChoice = document.getElementById("language");
const initial = JSON.parse(document.getElementById("initial-cell").textContent);
let permalinkRequest = 0;

function post(path, fields) {
  return fetch(path, { method: "POST", body: new URLSearchParams(fields) }).then(async (response) => {
    const answer = await response.json();
    if (!response.ok) {
      throw new Error(answer.error || `HTTP ${response.status}`);
    }
    return answer;
  });
}

function show(text, kind) {
  const part = document.createElement("span");
  part.className = kind;
  part.textContent = text;
  output.appendChild(part);
}

// As upstream's page sends it: the Sage kernel runs Sage; other languages go wrapped in a Python call.
function wrapped(code, language) {
  if (language === "sage" || !initial.languages.includes("sage")) {
    return code;
  }
  const quoted = '("""' + code.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '""")';
  return language === "python" ? "exec" + quoted : "print(" + language + ".eval" + quoted + ")";
}

async function run() {
  output.textContent = "";
  statusLine.textContent = "running…";
  try {
    const answer = await post("service", { code: wrapped(editor.value, languageChoice.value) });
    show(answer.stdout, "stdout");
    if (answer.stderr) {
      show(answer.stderr, "stderr");
    }
    const reply = answer.execute_reply;
    if (!answer.success && reply) {
      show(`${reply.ename}: ${reply.evalue}\n`, "error");
    }
    statusLine.textContent = answer.success ? "done" : "failed";
  } catch (error) {
    show(`${error.message}\n`, "error");
    statusLine.textContent = "failed";
  }
}

async function permalink() {
  statusLine.textContent = "saving…";
  const sent = ++permalinkRequest;
  const language = languageChoice.value;
  try {
    const answer = await post("permalink", { code: editor.value, language, interacts: initial.interacts, n: sent });
    if (answer.n !== permalinkRequest) {
      return; // a later request's answer is the one to show
    }
    const base = window.location.href.split("?")[0];
    document.getElementById("query-link").href = `${base}?q=${answer.query}`;
    document.getElementById("zip-link").href = `${base}?z=${answer.zip}&lang=${language}&interacts=${answer.interacts}`;
    document.getElementById("links").hidden = false;
    statusLine.textContent = "permalink ready";
  } catch (error) {
    statusLine.textContent = `permalink failed: ${error.message}`;
  }
}

for (const language of initial.languages) {
  const option = document.createElement("option");
  option.value = option.textContent = language;
  languageChoice.appendChild(option);
}
languageChoice.value = initial.language;
document.getElementById("run").addEventListener("click", run);
document.getElementById("permalink").addEventListener("click", permalink);
editor.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.shiftKey) {
    event.preventDefault();
    run();
  }
});

editor.value = initial.code;
if (initial.autoeval) {
  run();
}
