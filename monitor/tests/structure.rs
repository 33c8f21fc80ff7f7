//! The import graph between source files: which file names another file's items, through `use`
//! or a path written in code (`crate::..`, `super::..`, `self::..`). Files that import each other
//! in a circle can't be understood, tested or moved one at a time, and the layers every runtime
//! shares must not reach into one runtime's code.
//!
//! The sources are read as text, not compiled: comments and literals are blanked, the rest is
//! split into tokens, and each path is resolved through the `mod` tree and the `use`
//! declarations of the files it passes (re-exports included) to the file that defines the item.
//! A private `use` or a path in code is an edge; a `pub use` only when the file uses the name
//! itself, since otherwise it only forwards other files' imports. A file naming what one of
//! its ancestor modules defines (a child using its folder's error type from `mod.rs`) is no
//! edge: a folder's `mod.rs` is where what its files share lives, and the tree itself already
//! orders them. Files that import each other across folders or beside each other are what the
//! circles are made of.
#![allow(
    clippy::unwrap_used,
    clippy::print_stderr,
    reason = "a test: a failure is the report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// Layers every runtime builds on, under `monitor/src/` (a folder `x/` or a file `x.rs`): they
/// must not import from a runtime, or each new runtime means editing them.
const SHARED: &[&str] = &["watch", "detect", "output"];
/// Code for one runtime each (a folder `x/` or a file `x.rs` under `monitor/src/`).
const RUNTIMES: &[&str] = &["go", "tokio"];

/// How many `use` declarations resolving one path may pass through: re-export chains are
/// short, and the limit ends loops (two globs importing each other).
const MAX_HOPS: usize = 8;

/// file -> file it imports from -> the names that make that edge.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn no_import_cycles_in_monitor() {
    let report = cycles_report(&monitor_graph());
    assert!(
        report.is_empty(),
        "files import each other in a circle:\n{report}"
    );
}

#[test]
fn no_import_cycles_in_xtask() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src");
    let graph = file_graph(&read_sources(&dir, "xtask/src"), &["xtask/src/main.rs"]);
    let report = cycles_report(&graph);
    assert!(
        report.is_empty(),
        "files import each other in a circle:\n{report}"
    );
}

#[test]
fn shared_layers_import_no_runtime() {
    let mut offending = String::new();
    for (from, targets) in &monitor_graph() {
        if !SHARED.contains(&layer(from)) {
            continue;
        }
        for (to, names) in targets {
            if RUNTIMES.contains(&layer(to)) {
                writeln!(offending, "    {from} -> {to}: {}", join(names)).unwrap();
            }
        }
    }
    assert!(
        offending.is_empty(),
        "shared layers {SHARED:?} import runtime code {RUNTIMES:?}:\n{offending}"
    );
}

/// The checker itself: it finds a two-file circle, sees through a re-export to the file that
/// defines the item, and ignores paths in comments and literals (so it can fail, and only
/// for code).
#[test]
fn checker_finds_circles_and_sees_through_reexports() {
    let files = [
        ("src/lib.rs", "mod a;\nmod b;\npub(crate) mod facade;\n"),
        ("src/a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "src/b.rs",
            "pub struct B;\npub fn a() -> crate::a::A {\n    todo!()\n}\n",
        ),
        (
            "src/facade/mod.rs",
            "mod child;\nmod user;\npub use child::{X, Y};\npub struct Error;\nfn f(y: Y) {}\n",
        ),
        (
            "src/facade/child.rs",
            "pub struct X;\npub struct Y;\nfn e() -> super::Error {\n    todo!()\n}\n\
             #[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        (
            "src/facade/user.rs",
            "//! Names crate::a::A in a doc comment.\n\
             use super::X;\n\
             /* crate::b::B in a /* nested */ comment */\n\
             fn quote<'a>(s: &'a str) -> (char, &'a str) {\n\
                 ('\"', r#\"crate::b::B \"in\" a raw string\"#)\n\
             }\n",
        ),
    ];
    let sources = files.map(|(file, text)| (file.to_string(), text.to_string()));
    let graph = file_graph(&BTreeMap::from(sources), &["src/lib.rs"]);

    let child = "src/facade/child.rs";
    assert_eq!(cycles(&graph), [["src/a.rs", "src/b.rs"]]);
    assert!(cycles_report(&graph).contains("src/a.rs -> src/b.rs: B"));
    let to_child =
        |name: &str| BTreeMap::from([(child.to_string(), BTreeSet::from([name.into()]))]);
    assert_eq!(graph.get("src/facade/user.rs"), Some(&to_child("X")));
    // A re-export is an import only of what the file uses itself (`Y`, not `X`).
    assert_eq!(graph.get("src/facade/mod.rs"), Some(&to_child("Y")));
    // `use super::*` in a test module is the file itself, and its parent's error type no edge.
    assert!(!graph.contains_key(child));
}

fn monitor_graph() -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let roots = ["monitor/src/lib.rs", "monitor/src/main.rs"];
    file_graph(&read_sources(&dir, "monitor/src"), &roots)
}

/// Every `.rs` file under `dir`, keyed by `label/relative/path.rs`.
fn read_sources(dir: &Path, label: &str) -> BTreeMap<String, String> {
    let mut sources = BTreeMap::new();
    let mut dirs = vec![(dir.to_path_buf(), label.to_string())];
    while let Some((dir, label)) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{label}/{}", path.file_name().unwrap().to_string_lossy());
            if path.is_dir() {
                dirs.push((path, name));
            } else if name.ends_with(".rs") {
                sources.insert(name, fs::read_to_string(&path).unwrap());
            }
        }
    }
    sources
}

/// The top folder or file under `monitor/src/`, without `.rs`: `watch` for `watch/target.rs`.
fn layer(file: &str) -> &str {
    let rest = file.strip_prefix("monitor/src/").unwrap_or(file);
    let top = rest.split('/').next().unwrap_or(rest);
    top.strip_suffix(".rs").unwrap_or(top)
}

fn join(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- Reading a file: comments and literals out, tokens, then what it defines and names ----

/// The code with comments and string/char literals blanked, so paths in docs and messages
/// don't count.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut code = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let end = literal_or_comment_end(&c, i);
        if end > i {
            code.push(' ');
            i = end;
        } else {
            code.push(c[i]);
            i += 1;
        }
    }
    code
}

/// Where the comment or literal starting at `i` ends, or `i` when none starts there.
fn literal_or_comment_end(c: &[char], i: usize) -> usize {
    let before = i.checked_sub(1).map_or(' ', |k| c[k]);
    match (c[i], at(c, i + 1)) {
        ('/', '/') => (i..c.len()).find(|&k| c[k] == '\n').unwrap_or(c.len()),
        ('/', '*') => block_comment_end(c, i),
        ('"', _) => quoted_end(c, i + 1, '"'),
        ('\'', '\\') => quoted_end(c, i + 1, '\''),
        // `'x'` is a char; `'a` (no closing quote after one char) a lifetime or label.
        ('\'', _) if at(c, i + 2) == '\'' => i + 3,
        ('b' | 'c' | 'r', _) if !is_ident_char(before) => prefixed_literal_end(c, i),
        _ => i,
    }
}

fn at(c: &[char], k: usize) -> char {
    c.get(k).copied().unwrap_or(' ')
}

fn is_ident_char(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Block comments nest in Rust.
fn block_comment_end(c: &[char], i: usize) -> usize {
    let (mut depth, mut k) = (0, i);
    while k < c.len() {
        match (c[k], at(c, k + 1)) {
            ('/', '*') => (depth, k) = (depth + 1, k + 2),
            ('*', '/') if depth == 1 => return k + 2,
            ('*', '/') => (depth, k) = (depth - 1, k + 2),
            _ => k += 1,
        }
    }
    c.len()
}

/// The end of a literal whose body starts at `k`, closed by `quote`, with `\` escapes.
fn quoted_end(c: &[char], mut k: usize, quote: char) -> usize {
    while k < c.len() {
        match c[k] {
            '\\' => k += 2,
            ch if ch == quote => return k + 1,
            _ => k += 1,
        }
    }
    c.len()
}

/// `b"..."`, `c"..."`, `b'x'` and raw strings `r"..."`, `br#"..."#`; `i` otherwise (an
/// identifier such as `bar`, or a raw identifier `r#type`).
fn prefixed_literal_end(c: &[char], i: usize) -> usize {
    let k = if matches!(c[i], 'b' | 'c') { i + 1 } else { i };
    if at(c, k) == 'r' {
        let hashes = c[k + 1..].iter().take_while(|&&ch| ch == '#').count();
        if at(c, k + 1 + hashes) != '"' {
            return i;
        }
        let closes = |e: &usize| c[*e] == '"' && (1..=hashes).all(|h| at(c, e + h) == '#');
        let body = k + 2 + hashes;
        (body..c.len())
            .find(closes)
            .map_or(c.len(), |e| e + 1 + hashes)
    } else if k > i && at(c, k) == '"' {
        quoted_end(c, k + 1, '"')
    } else if c[i] == 'b' && at(c, k) == '\'' {
        quoted_end(c, k + 1, '\'')
    } else {
        i
    }
}

/// Identifiers (lifetimes with their quote), `::`, and every other character on its own.
fn tokens(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let word = |from: usize| {
            c[from..]
                .iter()
                .take_while(|&&ch| is_ident_char(ch))
                .count()
        };
        let len = match c[i] {
            ch if is_ident_char(ch) => word(i),
            '\'' => 1 + word(i + 1),
            ':' if at(&c, i + 1) == ':' => 2,
            _ => 1,
        };
        if !c[i].is_whitespace() {
            tokens.push(c[i..i + len].iter().collect());
        }
        i += len;
    }
    tokens
}

fn tok(t: &[String], k: usize) -> &str {
    t.get(k).map_or("", String::as_str)
}

fn is_ident(s: &str) -> bool {
    s.starts_with(|ch: char| ch.is_alphabetic() || ch == '_')
}

/// What one file declares and names.
#[derive(Default)]
struct FileScan {
    /// `mod name;`: the files below this one.
    mods: Vec<String>,
    /// Items at the file's module level: what `path::to::this::NAME` can name directly.
    items: BTreeSet<String>,
    /// Module-level `use` declarations (any visibility): names other paths are resolved through.
    uses: Vec<Use>,
    /// Paths that make edges: private `use` declarations, paths written in code, and
    /// re-exports of names the file's own code uses.
    paths: Vec<Mention>,
}

/// One leaf of a `use` tree.
struct Use {
    path: Vec<String>,
    /// The name it brings into scope; `None` for a glob or `as _`.
    name: Option<String>,
}

struct Mention {
    path: Vec<String>,
    /// How many inline `mod x { }` blocks the path is written in (for `super::` and `self::`).
    depth: usize,
}

/// Words that follow an item keyword without being the item's name (`const fn`, `static mut`).
const NOT_NAMES: &[&str] = &["_", "fn", "mut", "unsafe", "async", "extern", "impl", "for"];

fn scan(code: &str) -> FileScan {
    let t = tokens(code);
    let mut scan = FileScan::default();
    let mut braces = 0;
    // The brace depth of each inline `mod x { }` body around the current token.
    let mut inline: Vec<usize> = Vec::new();
    let mut opens_mod = false;
    // Re-exports, and the names this file's own code uses bare (not `x.name`, `a::name`).
    let mut reexports = Vec::new();
    let mut bare_names = BTreeSet::new();
    let mut i = 0;
    while i < t.len() {
        // Outside function bodies, impls and traits: where items and scoped `use`s live.
        let module_level = braces == inline.last().copied().unwrap_or(0);
        let in_file_module = module_level && inline.is_empty();
        if is_bare_name(&t, i) {
            bare_names.insert(t[i].as_str());
        }
        match t[i].as_str() {
            "{" => {
                braces += 1;
                if opens_mod {
                    inline.push(braces);
                    opens_mod = false;
                }
            }
            "}" => {
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
                braces = braces.saturating_sub(1);
            }
            // Not `impl Trait + use<'a>` (precise capturing).
            "use" if tok(&t, i + 1) != "<" => {
                let (leaves, end) = use_leaves(&t, i);
                let (depth, public) = (inline.len(), is_public(&t, i));
                for leaf in leaves {
                    let mention = Mention {
                        path: leaf.path.clone(),
                        depth,
                    };
                    // A re-export is what other files' paths go through, not (by itself) an
                    // import of this file.
                    if public {
                        reexports.push((leaf.name.clone(), mention));
                    } else {
                        scan.paths.push(mention);
                    }
                    if in_file_module {
                        scan.uses.push(leaf);
                    }
                }
                i = end;
                continue;
            }
            "mod" if is_ident(tok(&t, i + 1)) => {
                let name = tok(&t, i + 1).to_string();
                match tok(&t, i + 2) {
                    "{" => opens_mod = true,
                    ";" if inline.is_empty() => scan.mods.push(name.clone()),
                    _ => {}
                }
                if in_file_module {
                    scan.items.insert(name);
                }
            }
            "crate" | "super" | "self" if tok(&t, i + 1) == "::" && !continues_path(&t, i) => {
                let depth = inline.len();
                scan.paths.push(Mention {
                    path: path_at(&t, i),
                    depth,
                });
            }
            _ if in_file_module => scan.items.extend(item_name(&t, i)),
            _ => {}
        }
        i += 1;
    }
    // A re-export whose name this file's own code uses is its import too (a `pub use` must not
    // hide a dependency).
    let used = |name: &Option<String>| name.as_deref().is_some_and(|n| bare_names.contains(n));
    let used_here = reexports.into_iter().filter(|(name, _)| used(name));
    scan.paths.extend(used_here.map(|(_, mention)| mention));
    scan
}

/// An identifier not reached through something else (`x.name`, `a::name`) and not a field or
/// binding being declared (`name: T`).
fn is_bare_name(t: &[String], i: usize) -> bool {
    let before = i.checked_sub(1).map_or("", |k| t[k].as_str());
    is_ident(&t[i]) && !matches!(before, "." | "::") && tok(t, i + 1) != ":"
}

/// Whether the `crate`/`super`/`self` at `i` is inside a longer path, or a visibility
/// `pub(in crate::x)` (which restricts, not imports).
fn continues_path(t: &[String], i: usize) -> bool {
    let before = |n: usize| i.checked_sub(n).map_or("", |k| t[k].as_str());
    before(1) == "::" || (before(1) == "in" && before(2) == "(" && before(3) == "pub")
}

/// `crate::a::B` from its first token; stops at a turbofish or anything else.
fn path_at(t: &[String], i: usize) -> Vec<String> {
    let mut path = vec![t[i].clone()];
    let mut k = i + 1;
    while tok(t, k) == "::" && is_ident(tok(t, k + 1)) {
        path.push(t[k + 1].clone());
        k += 2;
    }
    path
}

/// The name defined by the item keyword at `i` (`fn`, `struct`, `macro_rules!`, ...).
fn item_name(t: &[String], i: usize) -> Option<String> {
    let name = match t[i].as_str() {
        "const" | "static" if tok(t, i + 1) == "mut" => tok(t, i + 2),
        "struct" | "enum" | "fn" | "trait" | "type" | "union" | "const" | "static" => tok(t, i + 1),
        "macro_rules" if tok(t, i + 1) == "!" => tok(t, i + 2),
        _ => return None,
    };
    (is_ident(name) && !NOT_NAMES.contains(&name)).then(|| name.to_string())
}

/// The leaves of the `use` declaration at `i`, and the token after its `;`.
fn use_leaves(t: &[String], i: usize) -> (Vec<Use>, usize) {
    let mut k = i + 1;
    let mut leaves = Vec::new();
    use_tree(t, &mut k, &[], &mut leaves);
    let end = (k..t.len())
        .find(|&e| t[e] == ";")
        .map_or(t.len(), |e| e + 1);
    (leaves, end)
}

/// `pub use`, `pub(crate) use`, `pub(super) use`, `pub(in path) use`.
fn is_public(t: &[String], i: usize) -> bool {
    match i.checked_sub(1).map(|k| t[k].as_str()) {
        Some("pub") => true,
        Some(")") => t[..i]
            .iter()
            .rposition(|s| s == "(")
            .is_some_and(|open| open > 0 && t[open - 1] == "pub"),
        _ => false,
    }
}

/// The leaves of the use tree at `k` (`a::{b, c::{self, D as E}, *}`), each with `prefix`.
fn use_tree(t: &[String], k: &mut usize, prefix: &[String], leaves: &mut Vec<Use>) {
    let mut path = prefix.to_vec();
    loop {
        match tok(t, *k) {
            "::" => *k += 1,
            "{" => {
                *k += 1;
                while !matches!(tok(t, *k), "}" | "") {
                    let start = *k;
                    use_tree(t, k, &path, leaves);
                    if tok(t, *k) == "," || *k == start {
                        *k += 1;
                    }
                }
                *k += 1;
                return;
            }
            "*" => {
                *k += 1;
                path.push("*".to_string());
                leaves.push(Use { path, name: None });
                return;
            }
            "as" => break,
            seg if is_ident(seg) => {
                path.push(seg.to_string());
                *k += 1;
            }
            _ => break,
        }
    }
    if path.len() == prefix.len() {
        return;
    }
    // `a::{self}` is `a` itself.
    if path.len() > 1 && path.last().is_some_and(|s| s == "self") {
        path.pop();
    }
    let mut name = path.last().cloned();
    if tok(t, *k) == "as" {
        name = Some(tok(t, *k + 1).to_string()).filter(|alias| alias != "_");
        *k += 2;
    }
    leaves.push(Use { path, name });
}

// ---- Resolving paths through the module tree ----

struct Module {
    file: String,
    parent: Option<usize>,
    children: BTreeMap<String, usize>,
}

/// The crate's modules from `root` along `mod name;` (`name.rs` or `name/mod.rs`); the root is
/// the first.
fn module_tree(scans: &BTreeMap<String, FileScan>, root: &str) -> Vec<Module> {
    let root_dir = root.rsplit_once('/').map_or("", |(dir, _)| dir);
    let mut modules = vec![Module {
        file: root.to_string(),
        parent: None,
        children: BTreeMap::new(),
    }];
    let mut todo = vec![(0, root_dir.to_string())];
    while let Some((m, dir)) = todo.pop() {
        for name in &scans[modules[m].file.as_str()].mods {
            let candidates = [format!("{dir}/{name}.rs"), format!("{dir}/{name}/mod.rs")];
            let Some(file) = candidates.into_iter().find(|f| scans.contains_key(f)) else {
                eprintln!("{}: no file for `mod {name};`", modules[m].file);
                continue;
            };
            let child = modules.len();
            modules.push(Module {
                file,
                parent: Some(m),
                children: BTreeMap::new(),
            });
            modules[m].children.insert(name.clone(), child);
            // A module's children are in the folder named after it, for `x.rs` and `x/mod.rs`.
            todo.push((child, format!("{dir}/{name}")));
        }
    }
    modules
}

enum Target {
    /// An item, by name, defined in the file of this module (or the module itself).
    Local(usize, String),
    /// Another crate's item.
    Outside,
    Unknown,
}

struct Resolver<'a> {
    modules: &'a [Module],
    scans: &'a BTreeMap<String, FileScan>,
}

impl Resolver<'_> {
    fn scan(&self, m: usize) -> &FileScan {
        &self.scans[self.modules[m].file.as_str()]
    }

    /// Where `path`, written in module `from` inside `depth` inline modules, points.
    fn resolve(&self, from: usize, depth: usize, path: &[String], hops: usize) -> Target {
        let Some((mut m, mut rest)) = self.start(from, depth, path) else {
            return Target::Outside;
        };
        while let Some(&child) = rest.first().and_then(|s| self.modules[m].children.get(s)) {
            m = child;
            rest = &rest[1..];
        }
        let Some((name, tail)) = rest.split_first() else {
            let module = path.last().cloned().unwrap_or_default();
            return Target::Local(m, module);
        };
        if name == "*" || self.scan(m).items.contains(name) {
            return Target::Local(m, name.clone());
        }
        if hops == MAX_HOPS {
            return Target::Unknown;
        }
        self.through_uses(m, name, tail, hops + 1)
    }

    /// The module a path starts from, and its segments after that; `None` for other crates.
    fn start<'p>(
        &self,
        from: usize,
        depth: usize,
        path: &'p [String],
    ) -> Option<(usize, &'p [String])> {
        let supers = path.iter().take_while(|s| *s == "super").count();
        match path.first()?.as_str() {
            "crate" => Some((0, &path[1..])),
            // Still inside an inline module of this file: the file itself.
            "self" if depth > 0 => Some((from, &[])),
            "super" if supers < depth => Some((from, &[])),
            "self" => Some((from, &path[1..])),
            "super" => {
                let mut m = from;
                for _ in depth..supers {
                    m = self.modules[m].parent?;
                }
                Some((m, &path[supers..]))
            }
            // A `use` path may start with a name in scope (2018 paths): `use child::Item;`.
            first if self.in_scope(from, first) => Some((from, path)),
            _ => None,
        }
    }

    fn in_scope(&self, m: usize, name: &str) -> bool {
        let scan = self.scan(m);
        self.modules[m].children.contains_key(name)
            || scan.items.contains(name)
            || scan.uses.iter().any(|u| u.name.as_deref() == Some(name))
    }

    /// `name` (then `tail`), not defined in module `m`: where the `use` that brings it in
    /// points, trying globs last.
    fn through_uses(&self, m: usize, name: &String, tail: &[String], hops: usize) -> Target {
        let uses = &self.scan(m).uses;
        if let Some(u) = uses.iter().find(|u| u.name.as_ref() == Some(name)) {
            return self.resolve(m, 0, &[&u.path[..], tail].concat(), hops);
        }
        let globs = uses
            .iter()
            .filter(|u| u.path.last().is_some_and(|s| s == "*"));
        for glob in globs {
            let module = &glob.path[..glob.path.len() - 1];
            let path = [module, std::slice::from_ref(name), tail].concat();
            if let found @ Target::Local(..) = self.resolve(m, 0, &path, hops) {
                return found;
            }
        }
        Target::Unknown
    }
}

/// The file-to-file graph of the crates rooted at `roots`, over `sources` (file -> text).
fn file_graph(sources: &BTreeMap<String, String>, roots: &[&str]) -> Graph {
    let scans: BTreeMap<String, FileScan> = sources
        .iter()
        .map(|(file, text)| (file.clone(), scan(&strip(text))))
        .collect();
    let mut graph = Graph::new();
    for root in roots {
        add_crate_edges(&scans, root, &mut graph);
    }
    graph
}

fn add_crate_edges(scans: &BTreeMap<String, FileScan>, root: &str, graph: &mut Graph) {
    let modules = module_tree(scans, root);
    let resolver = Resolver {
        modules: &modules,
        scans,
    };
    for (m, module) in modules.iter().enumerate() {
        for mention in &resolver.scan(m).paths {
            match resolver.resolve(m, mention.depth, &mention.path, 0) {
                Target::Local(to, name)
                    if modules[to].file != module.file && !is_ancestor(&modules, to, m) =>
                {
                    let to = modules[to].file.clone();
                    let edge = graph.entry(module.file.clone()).or_default();
                    edge.entry(to).or_default().insert(name);
                }
                Target::Unknown => {
                    eprintln!("{}: can't resolve {}", module.file, mention.path.join("::"));
                }
                Target::Local(..) | Target::Outside => {}
            }
        }
    }
}

/// Whether module `a` encloses module `m`.
fn is_ancestor(modules: &[Module], a: usize, m: usize) -> bool {
    let mut at = modules[m].parent;
    while let Some(p) = at {
        if p == a {
            return true;
        }
        at = modules[p].parent;
    }
    false
}

// ---- Circles: strongly connected components (Tarjan) ----

/// Sets of two or more files that import each other in a circle, each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for file in graph.keys() {
        if !tarjan.index.contains_key(file.as_str()) {
            tarjan.visit(file);
        }
    }
    tarjan.found.sort();
    tarjan.found
}

struct Tarjan<'g> {
    graph: &'g Graph,
    /// Visit order of each file seen.
    index: BTreeMap<&'g str, usize>,
    /// The lowest visit order reachable through files still on the stack.
    low: BTreeMap<&'g str, usize>,
    stack: Vec<&'g str>,
    found: Vec<Vec<String>>,
}

impl<'g> Tarjan<'g> {
    fn visit(&mut self, file: &'g str) {
        let order = self.index.len();
        self.index.insert(file, order);
        self.low.insert(file, order);
        self.stack.push(file);
        let graph = self.graph;
        for next in graph.get(file).into_iter().flat_map(BTreeMap::keys) {
            let reach = if !self.index.contains_key(next.as_str()) {
                self.visit(next);
                self.low[next.as_str()]
            } else if self.stack.contains(&next.as_str()) {
                self.index[next.as_str()]
            } else {
                continue;
            };
            let low = self.low[file].min(reach);
            self.low.insert(file, low);
        }
        if self.low[file] == order {
            let at = self.stack.iter().rposition(|f| *f == file).unwrap();
            let mut component: Vec<String> = self.stack.drain(at..).map(str::to_string).collect();
            if component.len() > 1 {
                component.sort();
                self.found.push(component);
            }
        }
    }
}

/// Each circle's files, then the edges inside it with the names that make them.
fn cycles_report(graph: &Graph) -> String {
    let mut report = String::new();
    for (n, files) in cycles(graph).iter().enumerate() {
        writeln!(report, "circle {}: {}", n + 1, files.join(", ")).unwrap();
        for from in files {
            for (to, names) in graph.get(from).into_iter().flatten() {
                if files.contains(to) {
                    writeln!(report, "    {from} -> {to}: {}", join(names)).unwrap();
                }
            }
        }
    }
    report
}
