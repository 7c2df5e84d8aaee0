// The page of `aim-mlx serve`: it talks only to its own server's /api/, /thumb/ and /photo/.
"use strict";

const $ = (id) => document.getElementById(id);
const grid = $("results");
// image: a picked or dropped image, or like: the photo of "more like this"; either is a term searched
// with the text until its × clears it.
const state = { controller: null, seq: 0, photo: null, timer: 0, image: null, like: null, results: [] };
// Each search's times in ms from sending the request: the answer (fetchMs), the grid painted (paintMs),
// every thumbnail decoded (imagesMs). The browser test reads them.
window.aimTimings = [];

async function api(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// Resolves after the next frame has been painted (the first callback runs before that paint).
const painted = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function card(photo, caption) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.title = photo.path;
  button.addEventListener("click", () => view(photo.id));
  const img = document.createElement("img");
  img.src = `/thumb/${photo.id}`;
  img.alt = photo.name;
  img.addEventListener("error", () => button.classList.add("missing"));
  const label = document.createElement("span");
  label.textContent = caption;
  button.append(img, label);
  return button;
}

// A result's caption: its score, and for a video the time of its best frame (its poster).
function caption(hit) {
  return hit.kind === "video" ? `${hit.score.toFixed(3)} · ▶ ${clock(hit.time)}` : hit.score.toFixed(3);
}

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - 60 * minutes).toFixed(1).padStart(4, "0")}`;
}

// The results in the grid: by score as the server ranked them, or by capture date (newest first) under a
// heading per day, photos with no date last. The day is the date of `taken`, the camera's local time.
function render() {
  if ($("sort").value !== "date") {
    grid.replaceChildren(...state.results.map((hit) => card(hit, caption(hit))));
    return;
  }
  const dated = state.results.filter((hit) => hit.taken).sort((a, b) => (a.taken < b.taken ? 1 : -1));
  const days = [];
  for (const hit of [...dated, ...state.results.filter((hit) => !hit.taken)]) {
    const day = hit.taken ? hit.taken.slice(0, 10) : "no date";
    if (days.at(-1)?.day !== day) days.push({ day, hits: [] });
    days.at(-1).hits.push(hit);
  }
  grid.replaceChildren(
    ...days.flatMap(({ day, hits }) => {
      const title = document.createElement("h2");
      title.textContent = day;
      return [title, ...hits.map((hit) => card(hit, caption(hit)))];
    }),
  );
}

function showResults() {
  $("duplicates").hidden = true;
  grid.hidden = false;
  $("show-duplicates").setAttribute("aria-pressed", "false");
}

// One search at a time: a newer one aborts the request of the one before.
async function search(label, url, options = {}) {
  state.controller?.abort();
  const controller = (state.controller = new AbortController());
  const seq = ++state.seq;
  const start = performance.now();
  showResults();
  say(`Searching ${label}…`);
  let body;
  try {
    body = await api(url, { ...options, signal: controller.signal });
  } catch (error) {
    if (error.name !== "AbortError") say(error.message, true);
    return;
  }
  if (seq !== state.seq) return;
  const timing = { label, fetchMs: performance.now() - start };
  state.results = body.results;
  render();
  await painted();
  timing.paintMs = performance.now() - start;
  const count = body.results.length;
  say(`${count} photo${count === 1 ? "" : "s"} ${label} · ${Math.round(timing.paintMs)} ms`);
  await Promise.all([...grid.querySelectorAll("img")].map((img) => img.decode().catch(() => {})));
  timing.imagesMs = performance.now() - start;
  window.aimTimings.push(timing);
}

// The filters' parameters (the API's names) and the text, for a search's URL.
function params(text) {
  const query = new URLSearchParams();
  if (text) query.set("q", text);
  for (const input of $("filters").querySelectorAll("input")) {
    if (input.value.trim()) query.set(input.name, input.value.trim());
  }
  return query;
}

function searchText() {
  const text = $("q").value.trim();
  const hash = new URLSearchParams();
  if (state.like) hash.set("like", state.like.id);
  if (text) hash.set("q", text);
  history.replaceState(null, "", `#${hash}`);
  if (state.like) {
    similar(state.like);
    return;
  }
  if (state.image) {
    searchImage(state.image);
    return;
  }
  if (!text) {
    state.controller?.abort();
    state.results = [];
    grid.replaceChildren();
    say("");
    return;
  }
  search(`for “${text}”`, `/api/search?${params(text)}`);
}

// An image with whatever text is typed: both are terms of one query (the text may hold -terms).
function searchImage(file) {
  if (!file) return;
  state.image = file;
  state.like = null;
  $("image-name").textContent = `image ${file.name}`;
  $("image-term").hidden = false;
  const text = $("q").value.trim();
  search(`like ${file.name}${text ? ` and “${text}”` : ""}`, `/api/search/image?${params(text)}`, {
    method: "POST",
    body: file,
    headers: { "Content-Type": file.type || "application/octet-stream" },
  });
}

function clearTerm() {
  state.image = null;
  state.like = null;
  $("image-term").hidden = true;
  $("file").value = "";
  searchText();
}

async function view(id) {
  let photo;
  try {
    photo = await api(`/api/photo/${id}`);
  } catch (error) {
    say(error.message, true);
    return;
  }
  state.photo = photo;
  const video = photo.kind === "video";
  $("full").hidden = video;
  $("full-video").hidden = !video;
  if (video) {  // played from its best frame's time (a media fragment), that frame as poster
    $("full").removeAttribute("src");
    $("full-video").poster = `/thumb/${id}`;
    $("full-video").src = `/photo/${id}#t=${photo.time}`;
  } else {
    $("full-video").pause();
    $("full-video").removeAttribute("src");
    $("full").src = `/photo/${id}`;
  }
  $("full").alt = photo.name;
  $("full-open").href = `/photo/${id}`;
  $("full-path").textContent = photo.path;
  const taken = (photo.taken ? `Taken ${photo.taken.replace("T", " ")}` : "No capture date") +
    (video ? ` · video, best at ${clock(photo.time)}` : "");
  const size = photo.width ? ` · ${photo.width} × ${photo.height}` : "";
  const camera = photo.camera ? ` · ${photo.camera}` : "";
  const place = photo.lat !== null && photo.lat !== undefined ? ` · ${photo.lat.toFixed(5)}, ${photo.lon.toFixed(5)}` : "";
  $("full-facts").textContent = taken + size + camera + place;
  if (!$("viewer").open) $("viewer").showModal();
}

// The photo in the viewer becomes the query's id term, beside the text typed (the API's ?q= terms).
function moreLikeThis() {
  $("viewer").close();
  state.image = null;
  $("file").value = "";
  state.like = state.photo;
  $("image-name").textContent = `photo ${state.photo.name}`;
  $("image-term").hidden = false;
  searchText();
}

function similar(photo) {
  const text = $("q").value.trim();
  search(`like ${photo.name}${text ? ` and “${text}”` : ""}`, `/api/similar/${photo.id}?${params(text)}`);
}

async function showDuplicates() {
  state.controller?.abort();
  grid.hidden = true;
  $("duplicates").hidden = false;
  $("show-duplicates").setAttribute("aria-pressed", "true");
  say("Looking for duplicates…");
  try {
    const { groups } = await api("/api/duplicates");
    $("duplicates").replaceChildren(
      ...groups.map((group) => {
        const section = document.createElement("section");
        const title = document.createElement("h2");
        const kind = group.exact ? "identical" : `near copies (cosine ≥ ${group.score.toFixed(3)})`;
        title.textContent = `${group.ids.length} photos, ${kind}`;
        const row = document.createElement("div");
        row.className = "grid";
        row.append(
          ...group.ids.map((id, i) => {
            const name = group.paths[i].split(/[\\/]/).pop();
            return card({ id, path: group.paths[i], name }, name);
          }),
        );
        section.append(title, row);
        return section;
      }),
    );
    say(groups.length ? `${groups.length} group${groups.length === 1 ? "" : "s"} of duplicates` : "No duplicates");
  } catch (error) {
    say(error.message, true);
  }
}

// Arrow keys move the focus through a grid of cards (a row's length as laid out now); Enter opens the
// focused card (a button's own Enter); Esc closes the viewer (the dialog's own), else leaves the grid.
function onKey(event) {
  const focused = document.activeElement;
  if (event.key === "Escape" && !$("viewer").open && focused?.classList.contains("card")) {
    focused.blur();
    return;
  }
  const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: "up", ArrowDown: "down" }[event.key];
  if (!step || $("viewer").open || event.altKey || event.ctrlKey || event.metaKey) return;
  if (focused === $("q") && step === "down") {  // from the search box into the results
    const first = grid.hidden ? $("duplicates").querySelector(".card") : grid.querySelector(".card");
    if (first) {
      event.preventDefault();
      first.focus();
    }
    return;
  }
  if (!focused?.classList.contains("card")) return;
  const cards = [...focused.closest(".grid").querySelectorAll(".card")];
  event.preventDefault();
  const next = typeof step === "number" ? cards[cards.indexOf(focused) + step] : below(cards, focused, step);
  if (next) next.focus();
  else if (step === "up" && focused.closest("#results")) $("q").focus();  // back up to the box
}

// The card in the nearest row above or below `focused` (rows may be short under day headings), the one
// closest to it across.
function below(cards, focused, step) {
  const top = focused.offsetTop;
  const beyond = cards.filter((c) => (step === "down" ? c.offsetTop > top : c.offsetTop < top));
  if (!beyond.length) return null;
  const row = (step === "down" ? Math.min : Math.max)(...beyond.map((c) => c.offsetTop));
  const across = (c) => Math.abs(c.offsetLeft - focused.offsetLeft);
  return beyond.filter((c) => c.offsetTop === row).sort((a, b) => across(a) - across(b))[0];
}

async function start() {
  $("sort").addEventListener("change", render);
  addEventListener("keydown", onKey);
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(state.timer);
    searchText();
  });
  $("q").addEventListener("input", () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(searchText, 200);
  });
  $("file").addEventListener("change", (event) => searchImage(event.target.files[0]));
  $("image-clear").addEventListener("click", clearTerm);
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("filters").addEventListener("input", () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(searchText, 300);
  });
  $("filters").addEventListener("reset", () => setTimeout(searchText));  // after the fields are cleared
  $("show-duplicates").addEventListener("click", showDuplicates);
  $("more").addEventListener("click", moreLikeThis);
  $("close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("close", () => $("full-video").pause());
  $("viewer").addEventListener("click", (event) => event.target === $("viewer") && $("viewer").close());
  addEventListener("dragover", (event) => {
    event.preventDefault();
    $("drop").hidden = false;
  });
  $("drop").addEventListener("dragleave", () => ($("drop").hidden = true));
  addEventListener("drop", (event) => {
    event.preventDefault();
    $("drop").hidden = true;
    searchImage(event.dataTransfer.files[0]);
  });

  try {
    const library = await api("/api/status");
    say(`${library.photos} photos, indexed with ${library.model}`);
    if (!library.text) {
      $("q").disabled = true;
      $("q").placeholder = "This model searches by image only: drop or pick one";
    }
  } catch (error) {
    say(error.message, true);
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("q")) $("q").value = hash.get("q");
  if (hash.get("like")) {
    view(Number(hash.get("like"))).then(() => state.photo && moreLikeThis());
  } else if (hash.get("q")) {
    searchText();
  }
}

start();
