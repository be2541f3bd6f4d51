// A small Markdown renderer that can never produce markup from its input: every piece of text
// is HTML-escaped before any tag of ours is put around it, links keep only http(s) URLs, and
// images in replies are shown as links (a model cannot make the browser fetch anything).
// Covers what chat replies use: fenced and inline code, headings, lists, quotes, bold, italics,
// links and paragraphs.
"use strict";

const Markdown = (() => {
  const escape = (s) =>
    s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");

  const safeUrl = (u) => /^https?:\/\/[^\s"'<>]+$/i.test(u) ? u : null;

  // Inline spans of one line of already-split text (not escaped yet).
  function inline(text) {
    let out = "";
    // Code spans first: nothing inside them is formatted.
    const parts = text.split(/(`[^`]*`)/);
    for (const part of parts) {
      if (part.length >= 2 && part.startsWith("`") && part.endsWith("`")) {
        out += "<code>" + escape(part.slice(1, -1)) + "</code>";
        continue;
      }
      let s = escape(part);
      // [text](url): the URL was escaped with the rest; unescape only to check it.
      s = s.replace(/!?\[([^\]]*)\]\(([^)\s]+)\)/g, (m, label, url) => {
        const raw = url.replace(/&amp;/g, "&");
        const ok = safeUrl(raw);
        if (!ok) return m;
        return '<a href="' + escape(ok) + '" target="_blank" rel="noopener noreferrer nofollow">' + label + "</a>";
      });
      s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
      s = s.replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
      out += s;
    }
    return out;
  }

  function render(src) {
    const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
    let html = "";
    let para = [];
    let list = null; // "ul" | "ol"
    const flushPara = () => {
      if (para.length) html += "<p>" + para.map(inline).join("<br>") + "</p>";
      para = [];
    };
    const closeList = () => {
      if (list) html += "</" + list + ">";
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara(); closeList();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        const lang = fence[1] ? ' data-lang="' + escape(fence[1]) + '"' : "";
        html += "<pre" + lang + "><code>" + escape(code.join("\n")) + "</code></pre>";
        continue;
      }
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      if (heading) {
        flushPara(); closeList();
        const n = heading[1].length + 2; // h3..h6: a reply's headings stay below the page's
        html += "<h" + n + ">" + inline(heading[2]) + "</h" + n + ">";
        continue;
      }
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (bullet || numbered) {
        flushPara();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); html += "<" + kind + ">"; list = kind; }
        html += "<li>" + inline((bullet || numbered)[1]) + "</li>";
        continue;
      }
      const quote = line.match(/^>\s?(.*)$/);
      if (quote) {
        flushPara(); closeList();
        html += "<blockquote>" + inline(quote[1]) + "</blockquote>";
        continue;
      }
      if (!line.trim()) { flushPara(); closeList(); continue; }
      closeList();
      para.push(line);
    }
    flushPara(); closeList();
    return html;
  }

  return { render, escape };
})();
