// The cell page: one cell of the embed script, opened with the code of the ?z=, ?q= or ?c= link the server put
// into #initial-cell (run on open unless the link says autoeval=false).
"use strict";

const initial = JSON.parse(document.getElementById("initial-cell").textContent);
sagecell.makeSagecell({
  inputLocation: "#cell",
  code: initial.code,
  languages: initial.languages,
  defaultLanguage: initial.language,
  autoeval: initial.autoeval,
});
