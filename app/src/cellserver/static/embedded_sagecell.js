// The embed script: `sagecell.makeSagecell({...})` as SageMathCell's pages call it, against this server.
// A page that embeds SageMathCell points its script tag here and keeps its calls. Each evaluation gets a kernel
// session (POST kernel, then the kernel's channels over a WebSocket, or SockJS where WebSockets fail); linked
// cells share one. Output, plots, files and interacts arrive as upstream's kernels send them.
(function () {
  "use strict";

  if (window.sagecell && window.sagecell.makeSagecell) {
    return; // loaded twice by one page: the first copy keeps its cells
  }

  const script = document.currentScript;
  const root = (function serverRoot() {
    const source = script ? script.src : window.location.href;
    return source.replace(/[?#].*$/, "").replace(/(static\/)?embedded_sagecell\.js$/, "");
  })();

  const WRAPPED_LANGUAGES = ["gap", "gp", "html", "macaulay2", "maxima", "octave", "r", "singular"];
  const ALL_LANGUAGES = ["sage", "python", ...WRAPPED_LANGUAGES];
  const IMAGE_FILE = /\.(png|jpe?g|gif|svg)$/i;

  function element(tag, attributes, children) {
    const made = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "text") {
        made.textContent = value;
      } else {
        made.setAttribute(name, value);
      }
    }
    for (const child of children || []) {
      made.appendChild(child);
    }
    return made;
  }

  function pick(selector) {
    // a selector or an element, as upstream accepts for outputLocation
    if (!selector) {
      return null;
    }
    return typeof selector === "string" ? document.querySelector(selector) : selector;
  }

  // Code for the kernel, as upstream's page sends it: the Sage kernel runs Sage; Python runs through exec (so
  // ^ stays XOR); the other systems through Sage's interfaces.
  function codeFor(code, language) {
    if (language === "sage") {
      return code;
    }
    const quoted = '("""' + code.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '""")';
    if (language === "python") {
      return "exec" + quoted;
    }
    if (language === "html") {
      return "html" + quoted;
    }
    return "print(" + language + ".eval" + quoted + ")";
  }

  function withoutTerminalColours(text) {
    return text.replace(/\x1b\[[0-9;]*m/g, "");
  }

  // Scripts the cell needs, loaded once from this server; a page's AMD loader must not capture them.
  const loaded = {};
  function loadScript(path) {
    if (!loaded[path]) {
      loaded[path] = new Promise((resolve, reject) => {
        const amd = window.define;
        window.define = undefined;
        const tag = element("script", { src: root + path });
        tag.onload = () => {
          window.define = amd;
          resolve();
        };
        tag.onerror = () => {
          window.define = amd;
          reject(new Error(`could not load ${root + path}`));
        };
        document.head.appendChild(tag);
      });
    }
    return loaded[path];
  }

  function loadStyle(path) {
    if (!loaded[path]) {
      loaded[path] = Promise.resolve();
      document.head.appendChild(element("link", { rel: "stylesheet", href: root + path }));
    }
  }

  function editorReady() {
    loadStyle("static/codemirror/codemirror.css");
    loadStyle("static/embedded_sagecell.css");
    return loadScript("static/codemirror/codemirror.js").then(() => loadScript("static/codemirror/python.js"));
  }

  function cellSessionID() {
    if (!window.sagecell.cellSessionID) {
      window.sagecell.cellSessionID = (crypto.randomUUID && crypto.randomUUID()) || String(Math.random()).slice(2);
    }
    return window.sagecell.cellSessionID;
  }

  function post(path, fields) {
    return fetch(root + path, {
      method: "POST",
      credentials: "include",
      headers: { Accept: "application/json" },
      body: new URLSearchParams(fields),
    }).then(async (response) => {
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        throw new Error(answer.error || `HTTP ${response.status}`);
      }
      return answer;
    });
  }

  // One SockJS connection per page carries every kernel that falls back to it, each message prefixed with
  // `<kernel id>/channels,` as upstream's multiplexing does.
  let sockjsLink = null;
  function sockjsConnection() {
    if (!sockjsLink) {
      sockjsLink = loadScript("static/sockjs.min.js").then(
        () =>
          new Promise((resolve, reject) => {
            // The page's CellSessionID in the URL keeps the connection with the cell of its kernels.
            const socket = new window.SockJS(`${root}sockjs?CellSessionID=${encodeURIComponent(cellSessionID())}`);
            const link = { socket, kernels: {} };
            socket.onopen = () => resolve(link);
            socket.onmessage = (event) => {
              const comma = event.data.indexOf(",");
              const kernel = link.kernels[event.data.slice(0, comma).split("/")[0]];
              if (kernel) {
                kernel.received(event.data.slice(comma + 1));
              }
            };
            socket.onclose = (event) => {
              sockjsLink = null;
              for (const kernel of Object.values(link.kernels)) {
                kernel.closed(event.reason);
              }
              reject(new Error("SockJS connection closed"));
            };
          }),
      );
    }
    return sockjsLink;
  }

  // A kernel session: created by POST kernel, then its messages over a WebSocket or SockJS.
  class Kernel {
    constructor(linked) {
      this.linked = linked;
      this.handlers = {}; // msg_id -> the cell's handler for the answers to that request
      this.ended = false;
      this.ready = this.start();
    }

    async start() {
      const fields = { CellSessionID: cellSessionID(), timeout: this.linked ? "inf" : "0", accepted_tos: "true" };
      const answer = await post("kernel", fields);
      this.id = answer.id;
      this.filesURL = `${root}kernel/${answer.id}/files/`;
      if (window.WebSocket) {
        try {
          await this.openWebSocket(answer.ws_url);
          return;
        } catch (error) {
          // a proxy that refuses WebSockets: fall back to SockJS as upstream's page does
        }
      }
      const link = await sockjsConnection();
      link.kernels[this.id] = this;
      this.transmit = (text) => link.socket.send(`${this.id}/channels,${text}`);
    }

    openWebSocket(wsURL) {
      return new Promise((resolve, reject) => {
        const socket = new WebSocket(`${wsURL}kernel/${this.id}/channels`);
        let opened = false;
        socket.onopen = () => {
          opened = true;
          this.transmit = (text) => socket.send(text);
          this.socket = socket;
          resolve();
        };
        socket.onmessage = (event) => this.received(event.data);
        socket.onerror = () => {
          if (!opened) {
            reject(new Error("no WebSocket"));
          }
        };
        socket.onclose = (event) => {
          if (opened) {
            this.closed(event.reason);
          }
        };
      });
    }

    send(msgType, content, handler) {
      const msgID = (crypto.randomUUID && crypto.randomUUID()) || String(Math.random()).slice(2);
      this.handlers[msgID] = handler;
      const message = {
        channel: "shell",
        header: { msg_id: msgID, msg_type: msgType, username: "", session: this.id, version: "5.3" },
        parent_header: {},
        metadata: {},
        content,
      };
      this.transmit(JSON.stringify(message));
      return msgID;
    }

    received(text) {
      const message = JSON.parse(text);
      const parent = message.parent_header && message.parent_header.msg_id;
      const handler = this.handlers[parent];
      if (message.msg_type === "status" && message.content.execution_state === "dead") {
        this.closed(message.content.reason || "");
        return;
      }
      if (handler) {
        handler(message);
      }
    }

    // The page is done with it (the cell runs again): end the session quietly, freeing the server's kernel.
    close() {
      this.ended = true;
      if (this.socket) {
        this.socket.close();
      } else if (this.id) {
        post(`kernel/${this.id}`, { method: "DELETE" }).catch(() => undefined);
      }
    }

    closed(reason) {
      if (this.ended) {
        return;
      }
      this.ended = true;
      for (const handler of new Set(Object.values(this.handlers))) {
        handler({ msg_type: "sagecell_ended", content: { reason } });
      }
    }
  }

  const linkedKernels = {};

  // A control of an interact, made from the kernel's description; `value()` is what the page sends back.
  function makeControl(description, changed) {
    const type = description.control_type;
    const holder = element("div", { class: `sagecell_interactControl sagecell_${type}` });
    const labelText = description.label || "";
    const label = element("label", { text: labelText });
    holder.appendChild(label);
    let input;
    let value;
    if (type === "slider") {
      const [min, max] = description.range;
      input = element("input", { type: "range", min, max, step: description.step, value: description.default });
      const shown = element("span", { class: "sagecell_sliderValue" });
      const show = () => {
        shown.textContent = description.values ? description.values[Number(input.value)] : input.value;
      };
      show();
      input.addEventListener("input", show);
      holder.append(input, shown);
      value = () => Number(input.value);
    } else if (type === "checkbox") {
      input = element("input", { type: "checkbox" });
      input.checked = Boolean(description.default);
      holder.appendChild(input);
      value = () => input.checked;
    } else if (type === "selector") {
      input = element("select");
      description.value_labels.forEach((text, index) => input.appendChild(element("option", { value: index, text })));
      input.value = String(description.default);
      holder.appendChild(input);
      value = () => Number(input.value);
    } else {
      input = element(description.subtype === "textarea" ? "textarea" : "input", { type: "text" });
      input.value = description.default;
      holder.appendChild(input);
      value = () => input.value;
    }
    label.htmlFor = input.id = `sagecell-control-${Math.random().toString(36).slice(2)}`;
    input.addEventListener("change", () => changed(value()));
    return holder;
  }

  class Cell {
    constructor(settings) {
      this.settings = settings;
      this.container = settings.inputLocation;
      this.code = settings.code !== undefined ? settings.code : Cell.codeIn(this.container);
      this.languages = settings.languages || ["sage"];
      this.language = this.languages.includes(settings.defaultLanguage) ? settings.defaultLanguage : this.languages[0];
      this.interacts = {};
      this.build();
    }

    // The code a page put in the element: a <script type="text/x-sage"> (markup-safe), a <textarea>, or text.
    static codeIn(container) {
      const source = container.querySelector("script[type='text/x-sage'], script[type='text/code'], textarea");
      const text = source ? source.value || source.textContent : container.textContent;
      return text.replace(/^\s*\n/, "").replace(/\s+$/, "");
    }

    hidden(part) {
      return (this.settings.hide || []).includes(part);
    }

    build() {
      const s = this.settings;
      this.editorArea = element("textarea", { class: "sagecell_commands", spellcheck: "false" });
      this.editorArea.value = this.code;
      this.evalButton = element("button", { type: "button", class: "sagecell_evalButton", text: s.evalButtonText || "Evaluate" });
      this.languageChoice = element("select", { class: "sagecell_language" });
      for (const language of this.languages) {
        this.languageChoice.appendChild(element("option", { value: language, text: language }));
      }
      this.languageChoice.value = this.language;
      this.status = element("span", { class: "sagecell_status", role: "status" });
      this.permalink = element("div", { class: "sagecell_permalink" });
      this.output = element("div", { class: "sagecell_output" });
      this.files = element("div", { class: "sagecell_sessionFiles" });
      this.messages = element("div", { class: "sagecell_messages", "aria-live": "polite" });
      const input = element("div", { class: "sagecell_input" }, [this.editorArea]);
      const controls = element("div", { class: "sagecell_controls" }, [this.evalButton, this.languageChoice, this.status]);
      const outputElements = element("div", { class: "sagecell_output_elements" }, [this.messages, this.output, this.files, this.permalink]);
      this.cell = element("div", { class: "sagecell" }, [input, controls]);
      if (this.hidden("editor")) {
        input.hidden = true;
      }
      this.evalButton.hidden = this.hidden("evalButton");
      this.languageChoice.hidden = this.hidden("language") || this.languages.length < 2;
      this.files.hidden = this.hidden("sessionFiles");
      this.permalink.hidden = this.hidden("permalink");
      this.container.textContent = "";
      this.container.appendChild(this.cell);
      (pick(s.outputLocation) || this.cell).appendChild(outputElements);
      this.evalButton.addEventListener("click", () => this.evaluate());
      this.languageChoice.addEventListener("change", () => {
        this.language = this.languageChoice.value;
      });
      this.editorArea.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && event.shiftKey) {
          event.preventDefault();
          this.evaluate();
        }
      });
      this.editorLoaded = editorReady().then(
        () => {
          this.editor = window.CodeMirror.fromTextArea(this.editorArea, {
            mode: "python",
            lineNumbers: true,
            viewportMargin: Infinity,
            extraKeys: { "Shift-Enter": () => this.evaluate() },
          });
        },
        () => undefined, // the plain textarea stays the editor
      );
    }

    getCode() {
      return this.editor ? this.editor.getValue() : this.editorArea.value;
    }

    setCode(code) {
      if (this.editor) {
        this.editor.setValue(code);
      } else {
        this.editorArea.value = code;
      }
    }

    kernel() {
      if (!this.settings.linked) {
        return new Kernel(false);
      }
      const key = this.settings.linkKey || "";
      if (!linkedKernels[key] || linkedKernels[key].ended) {
        linkedKernels[key] = new Kernel(true);
      }
      return linkedKernels[key];
    }

    async evaluate() {
      const code = this.getCode();
      this.clearOutput();
      this.interacts = {};
      this.setStatus("running");
      this.replied = null;
      this.idle = false;
      if (this.current && !this.current.linked && !this.current.ended) {
        this.current.close(); // an interact of the last run kept it
      }
      const kernel = this.kernel();
      this.current = kernel;
      try {
        await kernel.ready;
      } catch (error) {
        this.message(`The server refused a kernel: ${error.message}`);
        this.setStatus("failed");
        return;
      }
      this.request = kernel.send(
        "execute_request",
        {
          code: codeFor(code, this.language),
          silent: false,
          store_history: false,
          user_expressions: { _sagecell_files: "sys._sage_.new_files()" },
          allow_stdin: false,
        },
        (message) => this.handle(message, kernel),
      );
      if (!this.hidden("permalink")) {
        this.makePermalink(code);
      }
    }

    setStatus(state) {
      this.status.textContent = state;
      this.cell.dataset.state = state;
    }

    clearOutput() {
      this.output.textContent = "";
      this.files.textContent = "";
      this.messages.textContent = "";
    }

    message(text) {
      this.messages.appendChild(element("div", { class: "sagecell_message", text }));
    }

    handle(message, kernel) {
      const content = message.content || {};
      const block = this.blockFor(message);
      switch (message.msg_type) {
        case "stream":
          this.stream(block, content.name, content.text);
          break;
        case "error":
          block.appendChild(element("pre", { class: "sagecell_pyerr", text: withoutTerminalColours((content.traceback || []).join("\n")) }));
          break;
        case "display_data":
        case "execute_result":
          this.display(block, content.data || {}, kernel);
          break;
        case "execute_reply":
          this.replied = content.status;
          this.newFiles(content.payload, kernel);
          this.finishWhenComplete(message);
          break;
        case "status":
          if (content.execution_state === "idle" && message.parent_header.msg_id === this.request) {
            this.idle = true;
            this.finishWhenComplete(message);
          }
          break;
        case "sagenb.interact.update_interact_reply":
          if (content.status === "error") {
            block.appendChild(element("pre", { class: "sagecell_pyerr", text: `${content.ename}: ${content.evalue}` }));
          }
          this.newFiles(content.payload, kernel);
          break;
        case "sagecell_ended":
          if (this.current === kernel && (kernel.linked || Object.keys(this.interacts).length || this.cell.dataset.state === "running")) {
            this.message(`The kernel of this cell has ended${content.reason ? ` (${content.reason})` : ""}. Evaluate again for a new one.`);
            this.setStatus(this.cell.dataset.state === "running" ? "failed" : "ended");
          }
          break;
        default:
          break;
      }
    }

    blockFor(message) {
      const interact = message.metadata && this.interacts[message.metadata.interact_id];
      return interact ? interact.output : this.output;
    }

    stream(block, name, text) {
      const last = block.lastElementChild;
      if (last && last.tagName === "PRE" && last.classList.contains(`sagecell_${name}`)) {
        last.textContent += text;
      } else {
        block.appendChild(element("pre", { class: `sagecell_${name}`, text }));
      }
    }

    display(block, data, kernel) {
      if (data["application/sage-interact"]) {
        this.makeInteract(block, data["application/sage-interact"], kernel);
      } else if (data["application/sage-clear"]) {
        block.textContent = "";
      } else if (data["image/png"]) {
        block.appendChild(element("img", { src: `data:image/png;base64,${data["image/png"]}`, alt: data["text/plain"] || "" }));
      } else if (data["image/svg+xml"]) {
        const svg = encodeURIComponent(data["image/svg+xml"]);
        block.appendChild(element("img", { src: `data:image/svg+xml,${svg}`, alt: data["text/plain"] || "" }));
      } else if (data["text/image-filename"]) {
        block.appendChild(element("img", { src: kernel.filesURL + data["text/image-filename"] }));
      } else if (data["text/html"]) {
        const html = element("div", { class: "sagecell_html" });
        html.innerHTML = data["text/html"].replace(/cell:\/\//gi, kernel.filesURL);
        block.appendChild(html);
      } else if (data["text/plain"] !== undefined) {
        block.appendChild(element("pre", { class: "sagecell_result", text: data["text/plain"] }));
      }
    }

    makeInteract(block, description, kernel) {
      const interactID = description.new_interact_id;
      const output = element("div", { class: "sagecell_interactOutput" });
      const holder = element("div", { class: "sagecell_interact" });
      for (const [name, control] of Object.entries(description.controls)) {
        holder.appendChild(
          makeControl(control, (value) => {
            kernel.send(
              "sagenb.interact.update_interact",
              { interact_id: interactID, values: { [name]: value }, update_last: false },
              (message) => this.handle(message, kernel),
            );
          }),
        );
      }
      holder.appendChild(output);
      block.appendChild(holder);
      this.interacts[interactID] = { output };
    }

    // Done once the request has its reply (shell) and its idle status (iopub, after all its output): the two
    // channels may arrive in either order.
    finishWhenComplete(message) {
      if (message.parent_header.msg_id !== this.request || !this.replied || !this.idle) {
        return;
      }
      this.setStatus(this.replied === "ok" ? "done" : "failed");
    }

    newFiles(payload, kernel) {
      for (const part of payload || []) {
        for (const name of part.new_files || []) {
          const link = element("a", { href: kernel.filesURL + encodeURI(name), target: "_blank", text: name });
          const line = element("div", { class: "sagecell_file" }, [link]);
          if (IMAGE_FILE.test(name)) {
            line.appendChild(element("img", { src: kernel.filesURL + encodeURI(name), alt: name }));
          }
          this.files.appendChild(line);
        }
      }
    }

    async makePermalink(code) {
      try {
        const answer = await post("permalink", { code, language: this.language, interacts: "[]" });
        this.permalink.textContent = "";
        this.permalink.append(
          element("a", { class: "sagecell_permalink_query", href: `${root}?q=${answer.query}`, text: "Short temporary link" }),
          document.createTextNode(" "),
          element("a", { class: "sagecell_permalink_zip", href: `${root}?z=${answer.zip}&lang=${this.language}`, text: "Permalink" }),
        );
      } catch (error) {
        this.permalink.textContent = `no permalink: ${error.message}`;
      }
    }
  }

  const templates = {
    minimal: { hide: ["permalink", "language", "sessionFiles"] },
    restricted: { hide: ["editor", "language", "permalink"], evalButtonText: "Show" },
  };

  function whenReady(work) {
    if (document.readyState === "loading") {
      return new Promise((resolve) => document.addEventListener("DOMContentLoaded", () => resolve(work())));
    }
    return Promise.resolve(work());
  }

  // As upstream's: the settings come back at once (with `cells` filled in once the document is ready), a cell
  // for every element inputLocation matches, and callback runs when they are made.
  function makeSagecell(options) {
    const settings = { ...(options.template || {}), ...options, cells: [] };
    settings.hide = [...((options.template && options.template.hide) || []), ...(options.hide || [])];
    whenReady(() => {
      const containers = typeof settings.inputLocation === "string"
        ? Array.from(document.querySelectorAll(settings.inputLocation))
        : [settings.inputLocation];
      if (!containers.length || !containers[0]) {
        throw new Error(`sagecell: no element matches inputLocation ${settings.inputLocation}`);
      }
      for (const container of containers) {
        const cell = new Cell({ ...settings, inputLocation: container });
        settings.cells.push(cell);
        window.sagecell.cells.push(cell);
        cell.editorLoaded.then(() => settings.autoeval && cell.evaluate());
      }
      if (typeof settings.callback === "function") {
        settings.callback(settings.cells[0]);
      }
    });
    return settings;
  }

  window.sagecell = Object.assign(window.sagecell || {}, {
    root,
    makeSagecell,
    templates,
    allLanguages: ALL_LANGUAGES,
    cells: [],
    init: (callback) => whenReady(() => callback && callback()),
  });
})();
