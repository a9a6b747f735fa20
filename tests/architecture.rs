//! The dependency rules of `src/`, as the README's "Code layout" states them, checked on the
//! source: every `crate::<module>` path (in `use` lines and in code, comments excluded) is an
//! edge from the file's top-level module to that module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules, bottom to top: each may depend only on modules listed before it
/// (and only on those its entry in [`ALLOWED`] names).
const LAYERS: &[&str] = &[
    "context",
    "http",
    "config",
    "secrets",
    "observability",
    "fleet",
    "upstream",
    "layers",
    "app",
];

/// What each top-level module may use.
const ALLOWED: &[(&str, &[&str])] = &[
    // The request context is the vocabulary every layer shares: it depends on nothing.
    ("context", &[]),
    // Plumbing: body, headers, errors and their envelope, PEM files.
    ("http", &[]),
    // Config depends on no layer, metrics or app: it only describes and validates.
    ("config", &[]),
    ("secrets", &["config", "http"]),
    ("observability", &["context", "http", "config", "secrets"]),
    // The Redis link the replicas share: speaks Redis, knows nothing of HTTP or layers.
    ("fleet", &["config", "secrets", "observability"]),
    ("upstream", &["context", "http", "config", "observability"]),
    (
        "layers",
        &[
            "context",
            "http",
            "config",
            "secrets",
            "observability",
            "fleet",
        ],
    ),
    // Nothing depends on the app: it assembles everything else.
    (
        "app",
        &[
            "context",
            "http",
            "config",
            "secrets",
            "observability",
            "fleet",
            "upstream",
            "layers",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (line comments, doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal (a URL) is rare in paths we look for; cutting there
            // can only hide an edge inside that line's string, never invent one.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate-relative paths a file names: `crate::a::b` and `use crate::{a, b}` forms.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("crate::") {
        let start = i + at;
        // `cloudcasa_gateway::` or `some_crate::` would end in "crate::" too.
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        i = start + "crate::".len();
        if !boundary {
            continue;
        }
        if code[i..].starts_with('{') {
            let end = code[i..].find('}').map_or(code.len(), |e| i + e);
            for item in code[i + 1..end].split(',') {
                let segments: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if !segments.is_empty() {
                    out.push(segments);
                }
            }
            continue;
        }
        let segments: Vec<String> = code[i..]
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or("")
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if !segments.is_empty() {
            out.push(segments);
        }
    }
    out
}

/// The top-level module a file belongs to (`src/layers/09_cache/mod.rs` → `layers`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

struct Source {
    file: PathBuf,
    module: String,
    paths: Vec<Vec<String>>,
}

fn sources() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|file| {
            let module = module_of(&src, &file)?;
            let paths = crate_paths(&code(&std::fs::read_to_string(&file).unwrap()));
            Some(Source {
                file,
                module,
                paths,
            })
        })
        .collect()
}

fn edges(sources: &[Source]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources {
        graph.entry(s.module.clone()).or_default();
        for path in &s.paths {
            let to = &path[0];
            if to != &s.module && LAYERS.contains(&to.as_str()) {
                graph.get_mut(&s.module).unwrap().insert(to.clone());
            }
        }
    }
    graph
}

#[test]
fn every_top_level_module_is_placed() {
    let sources = sources();
    let modules: BTreeSet<&str> = sources.iter().map(|s| s.module.as_str()).collect();
    for m in &modules {
        assert!(
            LAYERS.contains(m),
            "src/{m} is not in the dependency rules (tests/architecture.rs, README)"
        );
    }
    assert_eq!(LAYERS.len(), ALLOWED.len());
}

#[test]
fn dependencies_run_one_way() {
    let sources = sources();
    let graph = edges(&sources);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut violations = Vec::new();
    for s in &sources {
        for path in &s.paths {
            let to = path[0].as_str();
            if to == s.module || !LAYERS.contains(&to) {
                continue;
            }
            if !allowed[s.module.as_str()].contains(&to) {
                violations.push(format!(
                    "{} ({}) uses crate::{}",
                    s.file.display(),
                    s.module,
                    path.join("::")
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    // No cycle: with the rules above this follows from the order, but say so if the rules
    // are ever loosened.
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m).unwrap();
    for (from, tos) in &graph {
        for to in tos {
            assert!(
                rank(to) < rank(from),
                "{from} -> {to} runs upward ({LAYERS:?} is bottom to top)"
            );
        }
    }
}

#[test]
fn layers_do_not_use_each_other_or_count_their_own_outcomes() {
    for s in sources().iter().filter(|s| s.module == "layers") {
        let name = s.file.file_name().unwrap().to_string_lossy().into_owned();
        for path in &s.paths {
            // A layer may use its own folder's modules, never another layer.
            if path[0] == "layers" {
                let layer = path.get(1).map(String::as_str).unwrap_or("");
                let own = s.file.to_string_lossy().contains(&format!("_{layer}"));
                assert!(
                    own,
                    "{} uses crate::{}: layers meet only in the context",
                    s.file.display(),
                    path.join("::")
                );
            }
            // Only the observer holds the metrics; other layers record facts on the exchange.
            let names_metrics = path.len() >= 3
                && path[0] == "observability"
                && path[1] == "metrics"
                && path[2..].iter().any(|p| p == "Metrics");
            assert!(
                !names_metrics || name == "02_observe.rs",
                "{} uses crate::{}: only the observe layer counts",
                s.file.display(),
                path.join("::")
            );
        }
    }
}

/// The facts on the exchange are read when the request completes, by the observe layer and the
/// audit record it builds (the fail-closed intent record is built by the same code); every
/// other module only records them. Calls are found by receiver name (`ex`, `exchange`), which is
/// how the code names an `Exchange`.
#[test]
fn only_the_observer_reads_the_facts() {
    const GETTERS: [&str; 7] = [
        "client", "decision", "refusal", "review", "cache", "upstream", "bytes_in",
    ];
    let readers = ["02_observe.rs", "record.rs", "context.rs"];
    let mut violations = Vec::new();
    for s in sources() {
        let name = s.file.file_name().unwrap().to_string_lossy().into_owned();
        if readers.contains(&name.as_str()) {
            continue;
        }
        let code = code(&std::fs::read_to_string(&s.file).unwrap());
        for getter in GETTERS {
            for receiver in ["ex.", "exchange."] {
                let call = format!("{receiver}{getter}()");
                let called = code.match_indices(&call).any(|(at, _)| {
                    // `ex.` must be the receiver, not the end of `index.`.
                    !code[..at]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if called {
                    violations.push(format!("{} reads {call}", s.file.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_parser_sees_grouped_and_inline_paths() {
    let text = "use crate::{http::body::Body, config::Config};\nlet x = crate::context::Exchange::of(&r); // crate::app\nlet y = cloudcasa_gateway::app::Gateway;";
    let paths = crate_paths(&code(text));
    assert_eq!(
        paths,
        vec![
            vec!["http".to_string(), "body".into(), "Body".into()],
            vec!["config".to_string(), "Config".into()],
            vec!["context".to_string(), "Exchange".into(), "of".into()],
        ]
    );
}
