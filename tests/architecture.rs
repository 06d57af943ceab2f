//! The architecture test. It reads every `src/**/*.rs` as text (std only),
//! works out which module file each `crate::`, `super::`, `self::` path (and
//! each `flinks_proxy::` path in main.rs) names, and checks two rules:
//!
//! 1. **No import circle between files.** A module file and its own
//!    descendants may use each other (`src/store.rs` ↔ `src/store/sqlite.rs`);
//!    any other circle fails. lib.rs (`crate`) is a file like the others:
//!    `use crate::lock` from a module imports upward and closes a circle with
//!    lib.rs's `pub use`/`start`.
//! 2. **Imports point down [`LAYERS`].** A file is in the layer of its
//!    top-level module (`src/net/upstream/h1.rs` → `net`); lib.rs is in the
//!    layer named `crate` (above every layer when none is), main.rs above
//!    every layer. Every top-level module must be in a layer, and every
//!    layer's module file must open with a `//!` doc comment.
//!
//! Reading a failure: a circle lists its files, then each import inside it
//! as `src/a.rs -> src/b.rs (line 12: Name)`; break it at one of those lines
//! (move the item down a layer, or pass it in). An upward import names both
//! files with their layers, the lines and the names imported.
//!
//! A path resolves to the longest prefix that is a module file
//! (`crate::store::crypto::Key` → `src/store/crypto.rs`). Comments, string
//! and char literals, `#[cfg(test)] mod tests` blocks and `tests.rs` files in
//! module folders are skipped; `mod x;` declarations are the tree, not
//! imports. `cargo test --test architecture -- --nocapture` also prints the
//! longest files and functions.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;

/// The layers, bottom first, by top-level module name (`crate`: lib.rs). A
/// file may use its own layer and the layers below it.
const LAYERS: &[&[&str]] = &[
    &["ground"],      // lock, secret, metrics, crypto, clock: knows no request
    &["net"],         // bodies, header policy, TLS, upstream pools, HTTP/1.1 wire
    &["config"],      // proxy.toml -> Config
    &["store"],       // the store and its SQLite/PostgreSQL backends
    &["tokens"],      // grant, jwt, a credential's TokenSource
    &["connections"], // per-user pools, the ledger
    &["webhooks"],    // lifecycle events: the outbox's deliverer, signatures
    &["proxy"],       // Generation, routes, handler, errors, access log, reload
    &["connect"],     // the [connect] listener's pages: links and callbacks
    &["admin"],       // /metrics, health, /status, connections API
    &["server"],      // listeners for the proxy and admin
    &["sandbox"],     // the Flinks-like token endpoint and API
    &["crate"],       // lib.rs: start, Running, StartError
    &["cli"],         // the subcommands main.rs dispatches to
];

/// A token of source text: an identifier, `::` or one punctuation char.
struct Tok {
    text: String,
    line: usize,
}

/// Tokens of Rust source, without comments, string/char literals, lifetimes.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut line = vec![1; c.len() + 1];
    for k in 0..c.len() {
        line[k + 1] = line[k] + usize::from(c[k] == '\n');
    }
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let (mut i, mut out) = (0, Vec::new());
    let mut push = |text: String, at: usize| {
        out.push(Tok {
            text,
            line: line[at],
        })
    };
    while i < c.len() {
        let start = i;
        match (c[i], at(i + 1)) {
            ('/', '/') => i = (i..c.len()).find(|&k| c[k] == '\n').unwrap_or(c.len()),
            ('/', '*') => {
                let mut depth = 0;
                while i < c.len() {
                    match (c[i], at(i + 1)) {
                        ('/', '*') => (depth, i) = (depth + 1, i + 2),
                        ('*', '/') if depth == 1 => {
                            i += 2;
                            break;
                        }
                        ('*', '/') => (depth, i) = (depth - 1, i + 2),
                        _ => i += 1,
                    }
                }
            }
            ('"', _) => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            ('\'', '\\') => i = (i + 3..c.len()).find(|&k| c[k] == '\'').unwrap_or(c.len()) + 1,
            ('\'', _) if at(i + 2) == '\'' => i += 3, // 'x'
            ('\'', _) => i += 1,                      // a lifetime: 'a
            (':', ':') => {
                push("::".into(), i);
                i += 2;
            }
            (ch, _) if ch.is_alphanumeric() || ch == '_' => {
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let hashes = (i..c.len()).take_while(|&k| c[k] == '#').count();
                if matches!(word.as_str(), "r" | "br") && at(i + hashes) == '"' {
                    let close = |k: &usize| c[*k] == '"' && (1..=hashes).all(|h| at(k + h) == '#');
                    i = (i + hashes + 1..c.len()).find(close).unwrap_or(c.len()) + hashes + 1;
                } else if !(word == "b" && matches!(at(i), '"' | '\'')) {
                    push(word, start);
                }
            }
            (ch, _) if ch.is_whitespace() => i += 1,
            (ch, _) => {
                push(ch.to_string(), i);
                i += 1;
            }
        }
    }
    out
}

/// Skips an item from `toks[i]` to its `;` or to the `}` closing its block.
fn skip_item(toks: &[Tok], mut i: usize) -> usize {
    let mut depth = 0;
    while let Some(t) = toks.get(i) {
        i += 1;
        match t.text.as_str() {
            ";" if depth == 0 => break,
            "{" => depth += 1,
            "}" if depth <= 1 => break,
            "}" => depth -= 1,
            _ => {}
        }
    }
    i
}

/// Reads the path or `use` tree at `toks[i]` (a `::` or a `super`) below
/// `prefix`, pushing every leaf path; returns the index after it.
fn use_tree(
    toks: &[Tok],
    mut i: usize,
    mut prefix: Vec<String>,
    leaves: &mut Vec<Vec<String>>,
) -> usize {
    let text = |k: usize| toks.get(k).map_or("", |t| t.text.as_str());
    let is_name = |s: &str| s == "*" || s.starts_with(|c: char| c.is_alphanumeric() || c == '_');
    loop {
        match (text(i), text(i + 1)) {
            ("super", _) => {
                prefix.pop();
                i += 1;
            }
            ("::", "{") => {
                i += 2;
                while !matches!(text(i), "}" | "") {
                    if text(i) == "self" {
                        leaves.push(prefix.clone());
                        i += 1;
                    } else {
                        let leaf = [prefix.clone(), vec![text(i).to_owned()]].concat();
                        i = use_tree(toks, i + 1, leaf, leaves);
                    }
                    i += if text(i) == "as" { 2 } else { 0 };
                    i += usize::from(text(i) == ",");
                }
                return i + 1;
            }
            ("::", next) if is_name(next) => {
                prefix.push(next.to_owned());
                i += 2;
            }
            _ => break,
        }
    }
    leaves.push(prefix);
    i
}

/// One reference from a file to a module file.
#[derive(Debug)]
struct Edge {
    from: usize,
    to: usize,
    line: usize,
    name: String,
}

/// The files (sorted, test files left out), their module paths (`None` for
/// main.rs, `[]` for lib.rs) and the references between them.
struct Graph {
    paths: Vec<String>,
    mods: Vec<Option<Vec<String>>>,
    edges: Vec<Edge>,
}

fn graph(files: &[(String, String)]) -> Graph {
    const TEST_MOD: [&str; 9] = ["#", "[", "cfg", "(", "test", ")", "]", "mod", "tests"];
    let is_test = |p: &str| p.ends_with("/tests.rs") && p.matches('/').count() > 1;
    let mut files: Vec<_> = files.iter().filter(|(p, _)| !is_test(p)).collect();
    files.sort();
    let paths: Vec<String> = files.iter().map(|(p, _)| p.clone()).collect();
    let mods: Vec<Option<Vec<String>>> = paths.iter().map(|p| module_path(p)).collect();
    let index: HashMap<&[String], usize> = mods
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((m.as_deref()?, i)))
        .collect();
    let mut edges = Vec::new();
    for (from, (_, src)) in files.iter().enumerate() {
        let toks = lex(src);
        let text = |k: usize| toks.get(k).map_or("", |t| t.text.as_str());
        // Inline `mod name {` blocks open here, with the depth inside them.
        let (mut inline, mut depth, mut i) = (Vec::<(String, usize)>::new(), 0, 0);
        while i < toks.len() {
            match text(i) {
                "#" if TEST_MOD.iter().enumerate().all(|(k, t)| text(i + k) == *t) => {
                    i = skip_item(&toks, i + TEST_MOD.len());
                    continue;
                }
                "{" => depth += 1,
                "}" if inline.last().is_some_and(|m| m.1 == depth) => {
                    inline.pop();
                    depth -= 1;
                }
                "}" => depth = depth.saturating_sub(1),
                "mod" if text(i + 2) == "{" => inline.push((text(i + 1).to_owned(), depth + 1)),
                _ => {}
            }
            let t = text(i);
            if text(i + 1) != "::" || (i > 0 && matches!(text(i - 1), "::" | ".")) {
                i += 1;
                continue;
            }
            let mut base = mods[from].clone().unwrap_or_default();
            base.extend(inline.iter().map(|m| m.0.clone()));
            let root = match (mods[from].is_some(), t) {
                (false, "flinks_proxy") | (true, "crate") => Some(Vec::new()),
                (true, "self" | "super") => Some(base),
                (true, _) => Some([base, vec![t.to_owned()]].concat())
                    .filter(|m| index.contains_key(m.as_slice())),
                (false, _) => None,
            };
            // Another crate's path (`std::{..}`) is read too, and dropped, so
            // that its segments are not taken for this crate's modules.
            let (line, mut leaves) = (toks[i].line, Vec::new());
            let found = root.is_some();
            i = use_tree(
                &toks,
                i + usize::from(t != "super"),
                root.unwrap_or_default(),
                &mut leaves,
            );
            for path in leaves.into_iter().filter(|_| found) {
                let Some(n) = (0..=path.len())
                    .rev()
                    .find(|&n| index.contains_key(&path[..n]))
                else {
                    continue;
                };
                let name = match path.last() {
                    _ if n < path.len() => path[n..].join("::"),
                    Some(last) => last.clone(),
                    None => "crate".into(),
                };
                let to = index[&path[..n]];
                if to != from {
                    edges.push(Edge {
                        from,
                        to,
                        line,
                        name,
                    });
                }
            }
        }
    }
    Graph { paths, mods, edges }
}

/// `src/a.rs` and `src/a/mod.rs` are `[a]`, `src/lib.rs` is `[]`, main.rs `None`.
fn module_path(path: &str) -> Option<Vec<String>> {
    let rel = path.strip_prefix("src/")?.strip_suffix(".rs")?;
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    match rel {
        "main" => return None,
        "lib" => parts.clear(),
        _ if rel.ends_with("/mod") => drop(parts.pop()),
        _ => {}
    }
    Some(parts)
}

/// Strongly connected components (Tarjan's algorithm), files sorted.
fn components(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    /// Per file its visit number and the lowest number it reaches.
    #[derive(Default)]
    struct T {
        num: HashMap<usize, (usize, usize)>,
        stack: Vec<usize>,
        out: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T, adj: &[Vec<usize>], v: usize) {
        let n = t.num.len();
        t.num.insert(v, (n, n));
        t.stack.push(v);
        for &w in &adj[v] {
            let reach = match t.num.get(&w) {
                None => {
                    visit(t, adj, w);
                    t.num[&w].1
                }
                Some(&(num, _)) if t.stack.contains(&w) => num,
                Some(_) => continue,
            };
            let low = &mut t.num.get_mut(&v).expect("visited").1;
            *low = (*low).min(reach);
        }
        if t.num[&v].0 == t.num[&v].1 {
            let at = t.stack.iter().rposition(|&x| x == v).expect("on the stack");
            let mut c = t.stack.split_off(at);
            c.sort();
            t.out.push(c);
        }
    }
    let mut t = T::default();
    for v in 0..adj.len() {
        if !t.num.contains_key(&v) {
            visit(&mut t, adj, v);
        }
    }
    t.out
}

/// The edges by (from, to) file pair, each pair's lines and names as
/// `(line 28: AccessLog, Entry; line 40: now_ms)`.
fn by_pair<'a>(edges: impl Iterator<Item = &'a Edge>) -> BTreeMap<(usize, usize), String> {
    let mut pairs: BTreeMap<_, BTreeMap<usize, Vec<&str>>> = BTreeMap::new();
    for e in edges {
        let names = pairs
            .entry((e.from, e.to))
            .or_default()
            .entry(e.line)
            .or_default();
        if !names.contains(&e.name.as_str()) {
            names.push(&e.name);
        }
    }
    let lines = |by_line: &BTreeMap<usize, Vec<&str>>| -> Vec<String> {
        by_line
            .iter()
            .map(|(l, n)| format!("line {l}: {}", n.join(", ")))
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| (*k, format!("({})", lines(v).join("; "))))
        .collect()
}

/// Checks both rules over `(path, text)` files (paths like `src/a/b.rs`) and
/// returns the problems, each naming files and lines.
fn check(files: &[(String, String)], layers: &[&[&str]]) -> Vec<String> {
    let g = graph(files);
    let mut problems = Vec::new();
    // Rule 1: circles over every edge; one that stays inside a single
    // module's subtree (`store.rs` and `store/*`) is allowed. Dropping the
    // parent-child edges instead would hide a circle that runs through a
    // re-export (`a -> store` re-exporting `store/sqlite`, `store/sqlite -> a`).
    let within_one_subtree = |c: &[usize]| {
        c.iter().any(|&root| match &g.mods[root] {
            Some(r) if !r.is_empty() => c
                .iter()
                .all(|&f| g.mods[f].as_ref().is_some_and(|m| m.starts_with(r))),
            _ => false,
        })
    };
    let mut adj = vec![Vec::new(); g.paths.len()];
    g.edges.iter().for_each(|e| adj[e.from].push(e.to));
    for c in components(&adj)
        .into_iter()
        .filter(|c| c.len() > 1 && !within_one_subtree(c))
    {
        let mut msg = format!("import circle between {} files:\n", c.len());
        c.iter()
            .for_each(|&f| msg += &format!("    {}\n", g.paths[f]));
        msg += "  imports inside it:";
        let inside = (g.edges.iter()).filter(|e| c.contains(&e.from) && c.contains(&e.to));
        for ((a, b), names) in by_pair(inside) {
            msg += &format!("\n    {} -> {} {names}", g.paths[a], g.paths[b]);
        }
        problems.push(msg);
    }
    // Rule 2: main.rs is the layer above the last; lib.rs too unless a
    // layer is named `crate`.
    let top = layers.len();
    let root = layers.iter().position(|l| l.contains(&"crate"));
    let layer: Vec<Option<usize>> = (g.mods.iter())
        .map(|m| match m.as_deref() {
            None => Some(top),
            Some([]) => Some(root.unwrap_or(top)),
            Some([first, ..]) => layers.iter().position(|l| l.contains(&first.as_str())),
        })
        .collect();
    let mut unplaced: Vec<&String> = (g.mods.iter().zip(&layer))
        .filter_map(|(m, l)| m.as_ref()?.first().filter(|_| l.is_none()))
        .collect();
    unplaced.dedup();
    for name in unplaced {
        let file = [format!("src/{name}.rs"), format!("src/{name}/mod.rs")]
            .into_iter()
            .find(|f| g.paths.contains(f))
            .unwrap_or(format!("src/{name}/"));
        problems.push(format!(
            "{file} is in no layer: add it to LAYERS in tests/architecture.rs and to lib.rs's Layout"
        ));
    }
    let label = |f: usize| match layer[f] {
        Some(l) if l < top => format!("layer {}", layers[l].join(", ")),
        _ => "above every layer".to_owned(),
    };
    let upward = g
        .edges
        .iter()
        .filter(|e| matches!((layer[e.from], layer[e.to]), (Some(a), Some(b)) if b > a));
    for ((a, b), names) in by_pair(upward) {
        let (pa, pb, la, lb) = (&g.paths[a], &g.paths[b], label(a), label(b));
        problems.push(format!(
            "upward import: {pa} ({la}) uses {pb} ({lb}) {names}"
        ));
    }
    let opens_with_doc = |t: &str| {
        t.lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim().starts_with("//!"))
    };
    let undocumented: Vec<&str> = (layers.iter().flat_map(|l| l.iter()))
        .flat_map(|n| [format!("src/{n}.rs"), format!("src/{n}/mod.rs")])
        .filter_map(|p| files.iter().find(|(q, t)| *q == p && !opens_with_doc(t)))
        .map(|(p, _)| p.as_str())
        .collect();
    if !undocumented.is_empty() {
        let list = undocumented.join(", ");
        problems.push(format!(
            "layer modules whose first line is no `//!` doc comment: {list}"
        ));
    }
    problems
}

/// Every `src/**/*.rs` as `("src/...", text)`.
fn read_src() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read a src/ folder") {
            let path = entry.expect("a src/ entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(root)
                    .expect("under the crate")
                    .to_string_lossy();
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((rel.replace('\\', "/"), text));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    walk(&root.join("src"), root, &mut out);
    out
}

#[test]
fn the_source_tree_keeps_its_layers() {
    let problems = check(&read_src(), LAYERS);
    let (n, all) = (problems.len(), problems.join("\n\n"));
    assert!(
        problems.is_empty(),
        "{n} architecture problem(s), see tests/architecture.rs:\n\n{all}\n"
    );
}

/// For information: the 10 longest files, and the 10 longest functions (a
/// `fn` line to the `}` at its indentation; unit-test modules left out).
#[test]
fn print_longest_files_and_functions() {
    let files = read_src();
    let mut longest: Vec<_> = files
        .iter()
        .map(|(p, t)| (t.lines().count(), p.clone()))
        .collect();
    let mut fns = Vec::new();
    let quals = [
        "pub",
        "pub(crate)",
        "pub(super)",
        "async",
        "const",
        "unsafe",
    ];
    let indent = |l: &str| l.len() - l.trim_start().len();
    for (path, text) in files.iter().filter(|(p, _)| !p.ends_with("/tests.rs")) {
        let code = text
            // An inline test module ends the code; `mod tests;` (tests in
            // their own file, declared at the top) does not.
            .split("\n#[cfg(test)]\nmod tests {")
            .next()
            .unwrap_or_default();
        let lines: Vec<&str> = code.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let Some((quals_, rest)) = t.split_once("fn ") else {
                continue;
            };
            if !quals_.split_whitespace().all(|w| quals.contains(&w)) || t.ends_with([';', '}']) {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let mut body = lines[i + 1..]
                .iter()
                .take_while(|m| m.trim().is_empty() || indent(m) >= indent(l));
            if let Some(n) =
                body.position(|m| indent(m) == indent(l) && m.trim_start().starts_with('}'))
            {
                fns.push((n + 2, format!("{path}:{} fn {name}", i + 1)));
            }
        }
    }
    for (what, list) in [("files", &mut longest), ("functions", &mut fns)] {
        list.sort_by(|a, b| b.cmp(a));
        eprintln!("longest {what} (lines):");
        list.iter()
            .take(10)
            .for_each(|(n, f)| eprintln!("  {n:5}  {f}"));
    }
}

/// Files from `== path` headers, each followed by its lines (trimmed).
fn tree(spec: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    for line in spec.lines().map(str::trim) {
        match (line.strip_prefix("== "), files.last_mut()) {
            (Some(path), _) => files.push((path.to_owned(), String::new())),
            (None, Some((_, text))) => *text += &format!("{line}\n"),
            (None, None) => {}
        }
    }
    files
}

#[test]
fn a_three_file_circle_is_reported_exactly() {
    let files = tree(
        "
        == src/lib.rs
        mod a; mod b; mod c; mod d;
        == src/a.rs
        //! A.
        use crate::b::B;
        == src/b.rs
        //! B.
        fn f() { crate::c::g() }
        == src/c.rs
        //! C.
        use super::a::A;
        use crate::d::D;
        == src/d.rs
        //! D.",
    );
    let expected = "import circle between 3 files:\n    src/a.rs\n    src/b.rs\n    src/c.rs\n  \
        imports inside it:\n    src/a.rs -> src/b.rs (line 2: B)\n    src/b.rs -> src/c.rs (line 2: g)\n    \
        src/c.rs -> src/a.rs (line 2: A)";
    assert_eq!(check(&files, &[&["a", "b", "c", "d"]]), [expected]);
}

#[test]
fn a_module_and_its_descendants_may_use_each_other() {
    let files = tree(
        "
        == src/lib.rs
        //! The crate.
        pub mod foo;
        pub use foo::Foo;
        == src/foo.rs
        //! Foo.
        mod bar;
        use self::bar::Bar;
        == src/foo/bar.rs
        use super::Foo;
        fn f() { crate::foo::make() }",
    );
    assert_eq!(check(&files, &[&["foo"]]), Vec::<String>::new());
}

#[test]
fn a_circle_through_a_re_export_is_reported() {
    let files = tree(
        "
        == src/lib.rs
        == src/a.rs
        //! A.
        use crate::store::Row;
        == src/store.rs
        //! Store.
        mod sqlite;
        pub use sqlite::Row;
        == src/store/sqlite.rs
        use crate::a::helper;",
    );
    let problems = check(&files, &[&["store"], &["a"]]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("import circle between 3 files")
                && p.contains("src/store/sqlite.rs -> src/a.rs")),
        "{problems:#?}"
    );
}

#[test]
fn an_upward_import_and_an_unplaced_module_are_reported() {
    let files = tree(
        "
        == src/lib.rs
        == src/low.rs
        //! Low.
        use crate::high::{Up, down};
        == src/high.rs
        // High, with no doc comment.
        == src/stray.rs",
    );
    let problems = check(&files, &[&["low"], &["high"]]);
    assert_eq!(
        problems,
        [
            "src/stray.rs is in no layer: add it to LAYERS in tests/architecture.rs and to lib.rs's Layout",
            "upward import: src/low.rs (layer low) uses src/high.rs (layer high) (line 2: Up, down)",
            "layer modules whose first line is no `//!` doc comment: src/high.rs",
        ]
    );
}

#[test]
fn lib_rs_takes_the_layer_named_crate() {
    let files = tree(
        "
        == src/lib.rs
        //! The crate.
        pub fn start() {}
        == src/low.rs
        //! Low.
        use crate::start;
        == src/cli.rs
        //! Cli.
        fn f() { crate::start() }",
    );
    let problems = check(&files, &[&["low"], &["crate"], &["cli"]]);
    assert_eq!(
        problems,
        ["upward import: src/low.rs (layer low) uses src/lib.rs (layer crate) (line 2: start)"]
    );
}

#[test]
fn nested_groups_and_inline_paths_are_edges() {
    let files = tree(
        "
        == src/lib.rs
        == src/a.rs
        == src/d.rs
        == src/x.rs
        == src/store.rs
        == src/store/crypto.rs
        == src/m.rs
        use crate::{a::{B, c}, d};
        fn f() {
            crate::x::f();
            let k = crate::store::crypto::Key::new(std::x::y);
            crate::store::now_ms();
        }",
    );
    let g = graph(&files);
    let found: Vec<String> = g
        .edges
        .iter()
        .map(|e| {
            format!(
                "{} {} {}: {}",
                g.paths[e.from], g.paths[e.to], e.line, e.name
            )
        })
        .collect();
    let expected = [
        "src/m.rs src/a.rs 1: B",
        "src/m.rs src/a.rs 1: c",
        "src/m.rs src/d.rs 1: d",
        "src/m.rs src/x.rs 3: f",
        "src/m.rs src/store/crypto.rs 4: Key::new",
        "src/m.rs src/store.rs 5: now_ms",
    ];
    assert_eq!(found, expected);
}

#[test]
fn comments_strings_and_test_modules_are_not_edges() {
    let files = tree(
        r##"
        == src/lib.rs
        == src/a.rs
        == src/a/tests.rs
        use crate::b::B;
        == src/b.rs
        //! See crate::a::A.
        /// Uses [`crate::a::A`].
        // crate::a::A
        /* crate::a::A /* nested crate::a::A */ crate::a::A */
        const S: &str = "crate::a::A \" crate::a::A";
        const R: &str = r#"crate::a::A " crate::a::A"#;
        fn f<'a>(x: &'a str) -> [char; 2] { ['"', '\''] }
        #[cfg(test)]
        mod tests {
            use crate::a::A;
            fn g() { crate::a::f() }
        }"##,
    );
    assert!(graph(&files).edges.is_empty(), "{:?}", graph(&files).edges);
}
