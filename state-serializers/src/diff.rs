//! What changed between two captures, for operators auditing a handover.
//!
//! Captures are compared as JSON trees. Lists of records are matched by their identity
//! field (`pid`, `fd`, `token`, `name`, `address`, `mount_point`, `page_size_kb`, `index`)
//! so that a reordering is no change and an added process shows as one addition; lists
//! of plain values (argv, environment, CPUs) are compared whole.

use serde::Serialize;
use serde_json::Value;

use crate::codec::Capture;
use crate::error::{Result, StateError};

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Location such as `tasks.tasks[pid=42].cwd`.
    pub path: String,
    /// Value in the first capture (`None`: added).
    pub old: Option<Value>,
    /// Value in the second capture (`None`: removed).
    pub new: Option<Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.old, &self.new) {
            (None, Some(n)) => write!(f, "+ {}: {n}", self.path),
            (Some(o), None) => write!(f, "- {}: {o}", self.path),
            (Some(o), Some(n)) => write!(f, "~ {}: {o} -> {n}", self.path),
            (None, None) => write!(f, "? {}", self.path),
        }
    }
}

const KEYS: [&str; 9] = [
    "pid",
    // Tasks of two different boots have different pids: match them by their command.
    "cmdline",
    "fd",
    "token",
    "name",
    "address",
    "mount_point",
    "page_size_kb",
    "index",
];

fn key_of(items: &[Value], key: &str) -> Option<Vec<String>> {
    let mut ids = Vec::with_capacity(items.len());
    for v in items {
        let id = v.as_object()?.get(key)?;
        if id.is_object() {
            return None;
        }
        let id = id.to_string();
        if ids.contains(&id) {
            return None;
        }
        ids.push(id);
    }
    Some(ids)
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<Change>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match y.get(k) {
                    Some(vb) => walk(&p, va, vb, out),
                    None => out.push(Change {
                        path: p,
                        old: Some(va.clone()),
                        new: None,
                    }),
                }
            }
            for (k, vb) in y {
                if !x.contains_key(k) {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push(Change {
                        path: p,
                        old: None,
                        new: Some(vb.clone()),
                    });
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            // The first identity field present and unique on both sides that pairs up at
            // least one element (or the only candidate when one side is empty).
            let keyed = KEYS.iter().find_map(|k| {
                let (ka, kb) = (key_of(x, k)?, key_of(y, k)?);
                let overlap = ka.iter().any(|i| kb.contains(i));
                (overlap || x.is_empty() || y.is_empty()).then_some((*k, ka, kb))
            });
            let Some((key, ka, kb)) = keyed else {
                out.push(Change {
                    path: path.to_owned(),
                    old: Some(a.clone()),
                    new: Some(b.clone()),
                });
                return;
            };
            for (i, id) in ka.iter().enumerate() {
                let p = format!("{path}[{key}={id}]");
                match kb.iter().position(|j| j == id) {
                    Some(j) => walk(&p, &x[i], &y[j], out),
                    None => out.push(Change {
                        path: p,
                        old: Some(x[i].clone()),
                        new: None,
                    }),
                }
            }
            for (j, id) in kb.iter().enumerate() {
                if !ka.contains(id) {
                    out.push(Change {
                        path: format!("{path}[{key}={id}]"),
                        old: None,
                        new: Some(y[j].clone()),
                    });
                }
            }
        }
        _ => out.push(Change {
            path: path.to_owned(),
            old: Some(a.clone()),
            new: Some(b.clone()),
        }),
    }
}

/// Differences between two JSON values.
pub fn diff_values(a: &Value, b: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk("", a, b, &mut out);
    out
}

/// Differences between two captures (both already migrated to the current schema).
pub fn diff_captures(a: &Capture, b: &Capture) -> Result<Vec<Change>> {
    let conv = |c: &Capture| {
        serde_json::to_value(c).map_err(|e| StateError::Encode {
            kind: "capture",
            detail: e.to_string(),
        })
    };
    Ok(diff_values(&conv(a)?, &conv(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyed_lists_match_by_identity() {
        let a = json!({"tasks": [{"pid": 1, "cwd": "/"}, {"pid": 2, "cwd": "/a"}]});
        let b = json!({"tasks": [{"pid": 2, "cwd": "/b"}, {"pid": 1, "cwd": "/"}, {"pid": 3, "cwd": "/"}]});
        let d = diff_values(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].path, "tasks[pid=2].cwd");
        assert_eq!(d[0].old, Some(json!("/a")));
        assert_eq!(d[1].path, "tasks[pid=3]");
        assert!(d[1].old.is_none());
        assert_eq!(
            d[1].to_string(),
            "+ tasks[pid=3]: {\"cwd\":\"/\",\"pid\":3}"
        );
    }

    #[test]
    fn plain_lists_and_fields() {
        let a = json!({"argv": ["a", "b"], "x": 1, "gone": true});
        let b = json!({"argv": ["a", "c"], "x": 2});
        let d = diff_values(&a, &b);
        let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, vec!["argv", "gone", "x"]);
        assert!(diff_values(&a, &a).is_empty());
    }

    #[test]
    fn tasks_of_another_boot_match_by_cmdline() {
        let a = json!({"tasks": [{"pid": 10, "cmdline": ["kv", "-p"], "cwd": "/a"}]});
        let b = json!({"tasks": [{"pid": 99, "cmdline": ["kv", "-p"], "cwd": "/b"}]});
        let d = diff_values(&a, &b);
        let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "tasks[cmdline=[\"kv\",\"-p\"]].cwd",
                "tasks[cmdline=[\"kv\",\"-p\"]].pid"
            ]
        );
    }
}
