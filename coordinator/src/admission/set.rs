//! `--set KEY=VALUE`, as the managed service's CLI has it: a dotted path into the
//! job file (`inputs.epochs=3`, `resources.instance_count=2`, `compute=gpu`), the
//! value read as JSON when it is (`3`, `true`, `{"a": 1}`), else as text.

use serde_json::Value;

use crate::{Error, Result};

/// Applies each `KEY=VALUE` to `doc`, in order; missing objects on the way are made.
pub fn apply(doc: &mut Value, sets: &[String]) -> Result<()> {
    for set in sets {
        let Some((path, raw)) = set.split_once('=') else {
            return Err(Error::invalid(
                "--set",
                format!("`{set}` is not KEY=VALUE (e.g. --set inputs.epochs=3)"),
            ));
        };
        let path = path.trim();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(Error::invalid(
                "--set",
                format!("`{path}` is not a key path"),
            ));
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let mut at = &mut *doc;
        let keys: Vec<&str> = path.split('.').collect();
        for (depth, key) in keys.iter().enumerate() {
            let last = depth + 1 == keys.len();
            if at.is_null() {
                *at = Value::Object(Default::default());
            }
            at = match at {
                Value::Object(map) if last => {
                    map.insert(key.to_string(), value.clone());
                    break;
                }
                Value::Object(map) => map.entry(key.to_string()).or_insert(Value::Null),
                Value::Array(list) => {
                    let index: usize = key.parse().map_err(|_| {
                        Error::invalid("--set", format!("`{key}` in `{path}` is not a list index"))
                    })?;
                    let slot = list.get_mut(index).ok_or_else(|| {
                        Error::invalid("--set", format!("`{path}`: the list has no item {index}"))
                    })?;
                    if last {
                        *slot = value.clone();
                        break;
                    }
                    slot
                }
                _ => {
                    return Err(Error::invalid(
                        "--set",
                        format!("`{path}`: `{key}` is inside a value that is not an object"),
                    ));
                }
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sets_values_by_path_and_makes_what_is_missing() {
        let mut doc = json!({"compute": "cpu", "inputs": {"epochs": 1}});
        apply(
            &mut doc,
            &[
                "compute=gpu".into(),
                "inputs.epochs=3".into(),
                "resources.instance_count=2".into(),
                "tags.note=hello world".into(),
            ],
        )
        .expect("applied");
        assert_eq!(
            doc,
            json!({"compute": "gpu", "inputs": {"epochs": 3}, "resources": {"instance_count": 2}, "tags": {"note": "hello world"}})
        );
        assert!(apply(&mut doc, &["nope".into()]).is_err());
        assert!(
            apply(&mut doc, &["compute.x=1".into()]).is_err(),
            "compute is text"
        );
        assert!(apply(&mut doc, &["a..b=1".into()]).is_err());
    }
}
