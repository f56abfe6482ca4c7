//! `${{inputs.NAME}}` and `${{outputs.NAME}}` in a job's command, as the managed
//! service reads them: literal inputs are put in at admission; data inputs and
//! outputs stay as `${{inputs.NAME}}` / `${{outputs.NAME}}` for the node's agent to
//! replace with the paths it made. A part in brackets (`[--lr ${{inputs.lr}}]`)
//! is optional: kept (without its brackets) when every input it names is given,
//! dropped when one is not.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Error, Result};

/// One `${{ ... }}` in a command.
#[derive(Debug, PartialEq, Eq)]
struct Expr {
    start: usize,
    end: usize,
    /// `inputs`, `outputs`, or whatever else it names.
    scope: String,
    name: String,
}

fn expressions(text: &str) -> Result<Vec<Expr>> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("${{") {
        let start = from + at;
        let Some(close) = text[start..].find("}}") else {
            return Err(Error::invalid(
                "command",
                format!("`{}` has no closing `}}}}`", &text[start..]),
            ));
        };
        let end = start + close + 2;
        let inner = text[start + 3..end - 2].trim();
        let (scope, name) = inner.split_once('.').unwrap_or((inner, ""));
        found.push(Expr {
            start,
            end,
            scope: scope.trim().to_string(),
            name: name.trim().to_string(),
        });
        from = end;
    }
    Ok(found)
}

/// What a command's expressions may name.
#[derive(Debug)]
pub struct Known<'a> {
    /// Literal inputs, by name, as text.
    pub literals: &'a BTreeMap<String, String>,
    /// Data inputs (paths on the node).
    pub data: &'a BTreeSet<String>,
    pub outputs: &'a BTreeSet<String>,
    /// A sweep's hyperparameters (each trial puts its values in).
    pub search_space: &'a BTreeSet<String>,
}

impl Known<'_> {
    fn given(&self, name: &str) -> bool {
        self.literals.contains_key(name) || self.data.contains(name)
    }
}

/// The command with literals put in, optional parts kept or dropped, and data
/// inputs and outputs in their one canonical form; an expression that names
/// nothing declared is refused, naming it.
pub fn resolve(command: &str, known: &Known) -> Result<String> {
    let without_optional = optional_parts(command, known)?;
    let mut out = String::with_capacity(without_optional.len());
    let mut last = 0;
    for expr in expressions(&without_optional)? {
        out.push_str(&without_optional[last..expr.start]);
        last = expr.end;
        let written = &without_optional[expr.start..expr.end];
        match expr.scope.as_str() {
            "inputs" => {
                if let Some(value) = known.literals.get(&expr.name) {
                    out.push_str(value);
                } else if known.data.contains(&expr.name) {
                    out.push_str(&format!("${{{{inputs.{}}}}}", expr.name));
                } else {
                    return Err(Error::invalid(
                        "command",
                        format!(
                            "`{written}` names no input; declare `inputs: {{{}: ...}}` or put the part in brackets to make it optional",
                            expr.name
                        ),
                    ));
                }
            }
            "outputs" => {
                if known.outputs.contains(&expr.name) {
                    out.push_str(&format!("${{{{outputs.{}}}}}", expr.name));
                } else {
                    return Err(Error::invalid(
                        "command",
                        format!(
                            "`{written}` names no output; declare `outputs: {{{}:}}`",
                            expr.name
                        ),
                    ));
                }
            }
            "search_space" if known.search_space.contains(&expr.name) => {
                out.push_str(&format!("${{{{search_space.{}}}}}", expr.name));
            }
            "search_space" if !known.search_space.is_empty() => {
                return Err(Error::invalid(
                    "trial.command",
                    format!(
                        "`{written}` names no hyperparameter; declare `search_space: {{{}: {{type: ..., ...}}}}`",
                        expr.name
                    ),
                ));
            }
            other => {
                return Err(Error::invalid(
                    "command",
                    format!(
                        "`{written}`: a command job's command may name `inputs.X` and `outputs.X`, not `{other}` (`search_space.X` belongs to a sweep's trial)"
                    ),
                ));
            }
        }
    }
    out.push_str(&without_optional[last..]);
    Ok(out)
}

/// `[ ... ]` parts that name an input: kept without brackets when every input
/// they name is given, else dropped. Other brackets are left alone.
fn optional_parts(command: &str, known: &Known) -> Result<String> {
    let mut out = String::with_capacity(command.len());
    let mut rest = command;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else {
            break;
        };
        let inside = &rest[open + 1..open + close];
        let names: Vec<Expr> = expressions(inside)?
            .into_iter()
            .filter(|e| e.scope == "inputs")
            .collect();
        out.push_str(&rest[..open]);
        if names.is_empty() {
            out.push_str(&rest[open..=open + close]);
        } else if names.iter().all(|e| known.given(&e.name)) {
            out.push_str(inside);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The names of the data inputs and outputs a resolved command still names.
pub fn placeholders(command: &str) -> Vec<(String, String)> {
    expressions(command)
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.scope, e.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    static EMPTY: BTreeSet<String> = BTreeSet::new();

    fn known<'a>(
        literals: &'a BTreeMap<String, String>,
        data: &'a BTreeSet<String>,
        outputs: &'a BTreeSet<String>,
    ) -> Known<'a> {
        Known {
            literals,
            data,
            outputs,
            search_space: &EMPTY,
        }
    }

    #[test]
    fn literals_go_in_paths_stay_for_the_node_and_unknown_names_are_refused() {
        let literals = BTreeMap::from([("epochs".to_string(), "3".to_string())]);
        let data = BTreeSet::from(["iris".to_string()]);
        let outputs = BTreeSet::from(["model".to_string()]);
        let k = known(&literals, &data, &outputs);
        let got = resolve(
            "python train.py --epochs ${{inputs.epochs}} --data ${{ inputs.iris }} --out ${{outputs.model}}",
            &k,
        )
        .expect("resolves");
        assert_eq!(
            got,
            "python train.py --epochs 3 --data ${{inputs.iris}} --out ${{outputs.model}}"
        );
        let err = resolve("echo ${{inputs.nope}}", &k).unwrap_err();
        assert!(
            err.to_string()
                .contains("`${{inputs.nope}}` names no input"),
            "{err}"
        );
        let err = resolve("echo ${{outputs.nope}}", &k).unwrap_err();
        assert!(err.to_string().contains("names no output"), "{err}");
        let err = resolve("echo ${{search_space.lr}}", &k).unwrap_err();
        assert!(err.to_string().contains("not `search_space`"), "{err}");
        let err = resolve("echo ${{inputs.epochs", &k).unwrap_err();
        assert!(err.to_string().contains("no closing"), "{err}");
    }

    #[test]
    fn optional_parts_are_kept_when_given_and_dropped_when_not() {
        let literals = BTreeMap::from([("lr".to_string(), "0.1".to_string())]);
        let none = BTreeSet::new();
        let k = known(&literals, &none, &none);
        assert_eq!(
            resolve(
                "train [--lr ${{inputs.lr}}] [--momentum ${{inputs.momentum}}]",
                &k
            )
            .expect("ok"),
            "train --lr 0.1 "
        );
        assert_eq!(
            resolve("test [ -f x ] && ls [a-z]*", &k).expect("ok"),
            "test [ -f x ] && ls [a-z]*",
            "brackets that name no input are the shell's"
        );
    }

    #[test]
    fn placeholders_name_what_is_left_for_the_node() {
        assert_eq!(
            placeholders("cat ${{inputs.a}} > ${{outputs.b}}/x"),
            vec![
                ("inputs".to_string(), "a".to_string()),
                ("outputs".to_string(), "b".to_string())
            ]
        );
    }
}
