//! The library's layers point one way (src/lib.rs): syscalls → core → instance host →
//! platforms → orchestrator, and the command line lives in the binaries only. This test
//! reads every library source file and checks each `crate::` path it names against that
//! order, that the top-level modules form no cycle, that platform implementations do not
//! reach into each other, and that every `unsafe` sits under `src/sys/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level library module (a module may use its own layer and lower ones).
const LAYERS: &[(&str, u8)] = &[
    ("sys", 0),
    ("exit", 1),
    ("fault", 1),
    ("telemetry", 1),
    ("model", 1),
    ("workload", 1),
    ("health", 1),
    ("record", 1),
    ("statedir", 1),
    ("verify", 1),
    ("handover", 1),
    ("events", 1),
    ("metrics", 1),
    ("host", 2),
    ("platform", 3),
    ("orchestrator", 4),
];

fn layer(module: &str) -> u8 {
    LAYERS.iter().find(|(m, _)| *m == module).map_or_else(
        || panic!("module {module} has no layer in tests/layers.rs"),
        |(_, l)| *l,
    )
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The library's files (not the binaries), with their path below `src/`.
fn library_files() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_owned();
            if rel.starts_with("bin") {
                return None;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            Some((rel, text))
        })
        .collect()
}

/// Code without comments (a doc link to another layer is not a dependency).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::a::b` paths named in `text`, as (a, b).
fn crate_paths(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + 7..];
        let a = ident(rest);
        let b = rest
            .strip_prefix(&a)
            .and_then(|r| r.strip_prefix("::"))
            .map(ident)
            .unwrap_or_default();
        out.push((a, b));
    }
    out
}

fn top(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

#[test]
fn every_crate_path_points_down_or_sideways() {
    let mut bad = Vec::new();
    for (rel, text) in library_files() {
        let me = top(&rel);
        if me == "lib" {
            continue;
        }
        for (a, _) in crate_paths(&code(&text)) {
            if a == me {
                continue;
            }
            if layer(&a) > layer(&me) {
                bad.push(format!("{} ({me}) uses crate::{a}", rel.display()));
            }
        }
    }
    assert!(bad.is_empty(), "upward dependencies:\n{}", bad.join("\n"));
}

#[test]
fn top_level_modules_form_no_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in library_files() {
        let me = top(&rel);
        if me == "lib" {
            continue;
        }
        for (a, _) in crate_paths(&code(&text)) {
            if a != me {
                edges.entry(me.clone()).or_default().insert(a);
            }
        }
    }
    // Kahn's algorithm: every module must be removable.
    let mut nodes: BTreeSet<String> = edges.keys().cloned().collect();
    nodes.extend(edges.values().flatten().cloned());
    loop {
        let free: Vec<String> = nodes
            .iter()
            .filter(|n| {
                edges
                    .get(*n)
                    .is_none_or(|out| out.iter().all(|o| !nodes.contains(o)))
            })
            .cloned()
            .collect();
        if free.is_empty() {
            break;
        }
        for f in free {
            nodes.remove(&f);
        }
    }
    assert!(
        nodes.is_empty(),
        "modules in a cycle: {nodes:?} ({edges:?})"
    );
}

#[test]
fn platforms_do_not_reach_into_each_other() {
    let mut bad = Vec::new();
    for (rel, text) in library_files() {
        let mut comps = rel.components();
        if comps.next().map(std::path::Component::as_os_str) != Some("platform".as_ref()) {
            continue;
        }
        let Some(me) = comps.next().map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned()
        }) else {
            continue;
        };
        if me == "mod" || me == "channel" {
            continue;
        }
        for (a, b) in crate_paths(&code(&text)) {
            if a == "platform" && ["emulated", "luo", "fake"].contains(&b.as_str()) && b != me {
                bad.push(format!(
                    "{} (platform {me}) uses crate::platform::{b}",
                    rel.display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn every_unsafe_block_is_in_the_syscall_layer() {
    let mut bad = Vec::new();
    for (rel, text) in library_files() {
        if rel.starts_with("sys") {
            continue;
        }
        for (n, line) in code(&text).lines().enumerate() {
            if line.contains("unsafe ") || line.contains("unsafe{") {
                bad.push(format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    assert!(bad.is_empty(), "unsafe outside src/sys: {bad:?}");
    // And the crate root denies it everywhere else.
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#![deny(unsafe_code)]"));
}

#[test]
fn the_library_knows_no_command_line() {
    for (rel, text) in library_files() {
        let c = code(&text);
        assert!(
            !c.contains("clap::") && !c.contains("crate::cli"),
            "{} uses the command line",
            rel.display()
        );
    }
}
