//! Every `unsafe` of the library crates sits in their syscall module, each block with a
//! `// SAFETY:` comment (clippy's `undocumented_unsafe_blocks`) behind a safe function. This
//! test reads every file under each crate's `src/` and fails on the word `unsafe` in code
//! (comments and string literals do not count) anywhere else, and checks that each crate
//! root has `#![deny(unsafe_code)]`, lifted by `#[allow(unsafe_code)]` on that module only.
//! (Test code is not library code: tests may use `unsafe` themselves. upgrade-agent, whose
//! syscall layer is a directory, is checked by its own upgrade-agent/tests/layers.rs.)

/// A crate: its directory, its syscall module below `src/`, the file declaring it and the
/// declarations that may follow its `#[allow(unsafe_code)]`.
struct Krate {
    dir: &'static str,
    sys: &'static str,
    declared_in: &'static str,
    declarations: &'static [&'static str],
}

const CRATES: &[Krate] = &[
    Krate {
        dir: "kho-proto",
        sys: "channel/sys.rs",
        declared_in: "channel/mod.rs",
        declarations: &["mod sys;"],
    },
    Krate {
        dir: "state-serializers",
        sys: "sys.rs",
        declared_in: "lib.rs",
        declarations: &["pub mod sys;"],
    },
    Krate {
        dir: "demo-kv",
        sys: "sys.rs",
        declared_in: "lib.rs",
        declarations: &["pub mod sys;"],
    },
];

use std::path::{Path, PathBuf};

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

/// Every file under the crate's `src/`, as (path below `src/`, text).
fn library_files(k: &Krate) -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(k.dir)
        .join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            (rel, text)
        })
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` with comments and the contents of string and char literals blanked (newlines
/// kept, so line numbers stay), leaving only code.
fn code(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let at = |i: usize| b.get(i).copied();
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '/' && at(i + 1) == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && at(i + 1) == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (i == 0
                || !is_ident(b[i - 1])
                || (matches!(b[i - 1], 'b' | 'c') && (i < 2 || !is_ident(b[i - 2]))))
            && {
                let mut j = i + 1;
                while at(j) == Some('#') {
                    j += 1;
                }
                at(j) == Some('"')
            }
        {
            // Raw string r#"..."#: ends at a quote followed by as many hashes.
            let mut hashes = 0;
            out.push('r');
            i += 1;
            while b[i] == '#' {
                hashes += 1;
                out.push('#');
                i += 1;
            }
            out.push('"');
            i += 1;
            while i < b.len() {
                if b[i] == '"' && (1..=hashes).all(|k| at(i + k) == Some('#')) {
                    out.push('"');
                    out.extend(std::iter::repeat_n('#', hashes));
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(b[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < b.len() {
                match b[i] {
                    '\\' => {
                        out.push(' ');
                        if let Some(n) = at(i + 1) {
                            out.push(blank(n));
                        }
                        i += 2;
                    }
                    '"' => {
                        out.push('"');
                        i += 1;
                        break;
                    }
                    x => {
                        out.push(blank(x));
                        i += 1;
                    }
                }
            }
        } else if c == '\'' && at(i + 1) == Some('\\') {
            // Escaped char literal ('\'', '\\', '\u{..}').
            out.push_str("'  ");
            i += 3;
            while i < b.len() && b[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else if c == '\'' && at(i + 2) == Some('\'') {
            out.push_str("' '");
            i += 3;
        } else {
            // Code, including a lifetime or label's quote.
            out.push(c);
            i += 1;
        }
    }
    out
}

/// 1-based line numbers where the word `unsafe` stands in `code`.
fn unsafe_words(code: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let word: Vec<char> = "unsafe".chars().collect();
        for s in 0..chars.len() {
            if chars[s..].starts_with(&word)
                && (s == 0 || !is_ident(chars[s - 1]))
                && chars.get(s + word.len()).is_none_or(|c| !is_ident(*c))
            {
                out.push(n + 1);
                break;
            }
        }
    }
    out
}

#[test]
fn the_scanner_sees_code_only() {
    let text = "let s = \"unsafe\"; // unsafe\n/* unsafe /* nested */ unsafe */ let q = '\"';\n\
                let r = r#\"unsafe \" unsafe\"#; let e = '\\'';\nfn f<'a>() { unsafe {} }\n\
                let unsafe_code = 1; let not_unsafe = b\"unsafe\";\n";
    assert_eq!(unsafe_words(&code(text)), vec![4]);
    assert_eq!(code(text).lines().count(), text.lines().count());
}

#[test]
fn unsafe_only_in_the_syscall_module() {
    for k in CRATES {
        let (dir, sys) = (k.dir, k.sys);
        let files = library_files(k);
        assert!(
            files.iter().any(|(rel, _)| rel == sys),
            "{dir}: {sys} is gone: update this test"
        );
        let mut bad = Vec::new();
        for (rel, text) in &files {
            let c = code(text);
            if rel == sys {
                assert!(
                    !unsafe_words(&c).is_empty(),
                    "{dir}: {sys} has no unsafe left: update this test"
                );
                continue;
            }
            for n in unsafe_words(&c) {
                bad.push(format!("{dir}/src/{rel}:{n}"));
            }
        }
        assert!(
            bad.is_empty(),
            "`unsafe` outside {dir}/src/{sys} (move it there behind a safe function): {bad:?}"
        );
    }
}

#[test]
fn each_root_denies_unsafe_and_only_the_syscall_module_is_exempt() {
    for k in CRATES {
        let dir = k.dir;
        let mut denied = false;
        let mut exempt = 0;
        let mut bad = Vec::new();
        for (rel, text) in library_files(k) {
            if rel == k.sys {
                continue;
            }
            let c = code(&text);
            let lines: Vec<&str> = c.lines().map(str::trim).collect();
            for (n, line) in lines.iter().enumerate() {
                if !line.contains("unsafe_code") {
                    continue;
                }
                let next = lines[n + 1..].iter().find(|l| !l.is_empty());
                if rel == "lib.rs" && *line == "#![deny(unsafe_code)]" {
                    denied = true;
                } else if rel == k.declared_in
                    && *line == "#[allow(unsafe_code)]"
                    && next.is_some_and(|l| k.declarations.contains(l))
                {
                    exempt += 1;
                } else {
                    bad.push(format!("{dir}/src/{rel}:{}: {line}", n + 1));
                }
            }
        }
        assert!(denied, "{dir}/src/lib.rs lacks #![deny(unsafe_code)]");
        assert_eq!(
            exempt, 1,
            "{dir}: expected one #[allow(unsafe_code)] on the syscall module in src/{}",
            k.declared_in
        );
        assert!(
            bad.is_empty(),
            "{dir}: other unsafe_code lint attributes: {bad:?}"
        );
    }
}
