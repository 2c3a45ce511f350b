// Keyboard labeling. Pairwise: 1/a A better, 2/b B better, 3/t tie, 4/x both bad,
// s cycles the strength. Ranking: numbers best first, '=' ties the next number with the
// previous one, Backspace takes one back, Esc clears, x toggles "all bad".
// Everywhere: Enter submits, r goes to the rationale (Esc leaves it, Ctrl+Enter submits
// from it), u undoes the last vote. The form works without this script too.
(function () {
  "use strict";

  const form = document.getElementById("vote-form");
  const undoForm = document.getElementById("undo-form");
  const statusLine = document.getElementById("status");

  function say(text) {
    if (statusLine) statusLine.textContent = text;
  }

  function isTyping(target) {
    return target && (target.tagName === "TEXTAREA" || target.tagName === "SELECT" ||
      (target.tagName === "INPUT" && !["radio", "checkbox"].includes(target.type)));
  }

  let submitting = false;
  function submit(f) {
    if (submitting) return;
    submitting = true;
    const button = f.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    HTMLFormElement.prototype.submit.call(f);  // immune to a field named "submit"
  }

  // ------------------------------------------------------------------ pairwise
  function pairwise() {
    const keys = { "1": "A", a: "A", "2": "B", b: "B", "3": "tie", t: "tie", "4": "both_bad", x: "both_bad" };
    const choices = Array.from(form.querySelectorAll("input[name=choice]"));
    const strengths = Array.from(form.querySelectorAll("input[name=strength]"));
    const cards = { A: document.getElementById("candidate-A"), B: document.getElementById("candidate-B") };

    function current() {
      const checked = choices.find((c) => c.checked);
      return checked ? checked.value : null;
    }

    function paint() {
      const choice = current();
      for (const card of Object.values(cards)) card.classList.remove("better", "worse", "tied", "bad");
      const place = { A: "", B: "" };
      if (choice === "A" || choice === "B") {
        const other = choice === "A" ? "B" : "A";
        cards[choice].classList.add("better");
        cards[other].classList.add("worse");
        place[choice] = "better";
      } else if (choice === "tie") {
        cards.A.classList.add("tied"); cards.B.classList.add("tied");
        place.A = place.B = "tie";
      } else if (choice === "both_bad") {
        cards.A.classList.add("bad"); cards.B.classList.add("bad");
        place.A = place.B = "bad";
      }
      for (const letter of ["A", "B"]) cards[letter].querySelector(".place").textContent = place[letter];
      const noPreference = choice === "tie" || choice === "both_bad";
      for (const s of strengths) s.disabled = noPreference && s.value !== "";
      if (noPreference) strengths[0].checked = true;
    }

    function choose(value) {
      for (const c of choices) c.checked = c.value === value;
      paint();
      say("");
    }

    function cycleStrength() {
      const choice = current();
      if (choice !== "A" && choice !== "B") {
        say("Choose A or B first: strength goes with a preference.");
        return;
      }
      const index = strengths.findIndex((s) => s.checked);
      strengths[(index + 1) % strengths.length].checked = true;
    }

    for (const c of choices) c.addEventListener("change", paint);
    paint();

    return function onKey(event) {
      const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
      if (keys[key]) { choose(keys[key]); return true; }
      if (key === "s") { cycleStrength(); return true; }
      if (key === "Enter") {
        if (current()) submit(form); else say("Choose first: 1 A, 2 B, 3 tie, 4 both bad.");
        return true;
      }
      return false;
    };
  }

  // ------------------------------------------------------------------ ranking
  function ranking(count) {
    const letters = "ABCDEFGHI".slice(0, count);
    const input = document.getElementById("ranking");
    const allBad = document.getElementById("all-bad");
    let groups = [];          // [[position, ...], ...] best first
    let pendingTie = false;   // '=' pressed: the next number joins the last group

    function position(token) {  // "C" or "3" -> 2
      return /^[1-9]$/.test(token) ? Number(token) - 1 : letters.indexOf(token);
    }

    function parse(text) {
      const out = [];
      const compact = text.replace(/\s+/g, "").toUpperCase();
      if (!compact) return out;
      for (const group of compact.split(">")) {
        const members = group.split("=").map(position).filter((i) => i >= 0 && i < count);
        if (members.length) out.push(members);
      }
      return out;
    }

    function placed() {
      return new Set(groups.flat());
    }

    function ordinal(n) {
      const suffix = n % 10 === 1 && n !== 11 ? "st" : n % 10 === 2 && n !== 12 ? "nd" : n % 10 === 3 && n !== 13 ? "rd" : "th";
      return n + suffix;
    }

    // Keys rewrite the text box; typing in the box only repaints the cards (never fights the caret).
    function paint(fromKeys = true) {
      if (fromKeys) {
        input.value = groups.map((g) => g.map((i) => letters[i]).join(" = ")).join(" > ") + (pendingTie ? " =" : "");
      }
      const placeOf = {};
      let seen = 0;
      groups.forEach((g) => {
        for (const i of g) placeOf[i] = (g.length > 1 ? "tied " : "") + ordinal(seen + 1);
        seen += g.length;
      });
      const best = new Set(groups.length ? groups[0] : []);
      for (let i = 0; i < count; i++) {
        const card = document.getElementById("candidate-" + letters[i]);
        card.classList.toggle("placed", i in placeOf);
        card.classList.toggle("better", best.has(i) && !allBad.checked);
        card.classList.toggle("bad", allBad.checked);
        card.querySelector(".place").textContent = placeOf[i] || "";
      }
    }

    function add(position) {
      if (placed().has(position)) { say(letters[position] + " is already ranked."); return; }
      if (pendingTie && groups.length) groups[groups.length - 1].push(position);
      else groups.push([position]);
      pendingTie = false;
      say("");
    }

    function back() {
      if (pendingTie) { pendingTie = false; return; }
      if (!groups.length) return;
      groups[groups.length - 1].pop();
      if (!groups[groups.length - 1].length) groups.pop();
    }

    function finish() {
      const left = [];
      const done = placed();
      for (let i = 0; i < count; i++) if (!done.has(i)) left.push(i);
      if (left.length === 1) { pendingTie = false; add(left[0]); paint(); }
      if (placed().size === count) { paint(); submit(form); }
      else say("Rank all " + count + " first (" + left.map((i) => letters[i]).join(", ") + " left).");
    }

    groups = parse(input.value);
    input.addEventListener("input", () => { groups = parse(input.value); pendingTie = false; paint(false); });
    allBad.addEventListener("change", () => paint(false));
    paint(false);

    return function onKey(event) {
      const key = event.key;
      if (/^[1-9]$/.test(key) && Number(key) <= count) { add(Number(key) - 1); paint(); return true; }
      if (key === "=") {
        if (groups.length) pendingTie = true; else say("Press a number first.");
        paint();
        return true;
      }
      if (key === "Backspace") { back(); paint(); return true; }
      if (key === "Escape") { groups = []; pendingTie = false; paint(); return true; }
      if (key.toLowerCase() === "x") { allBad.checked = !allBad.checked; paint(); return true; }
      if (key === "Enter") { finish(); return true; }
      return false;
    };
  }

  // ------------------------------------------------------------------ everywhere
  let onItemKey = () => false;
  if (form) {
    const count = Number(form.dataset.count);
    onItemKey = form.dataset.kind === "pairwise" ? pairwise() : ranking(count);
  }
  const rationale = document.getElementById("rationale");

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.metaKey) return;
    if (isTyping(event.target)) {
      if (event.key === "Escape") { event.target.blur(); event.preventDefault(); }
      else if (event.key === "Enter" && event.ctrlKey && form) { event.preventDefault(); onItemKey({ key: "Enter" }); }
      return;
    }
    if (event.ctrlKey) return;
    if (event.key === "u" && undoForm) { event.preventDefault(); submit(undoForm); return; }
    if (event.key === "r" && rationale) { event.preventDefault(); rationale.focus(); return; }
    if (form && onItemKey(event)) event.preventDefault();
  });
})();
