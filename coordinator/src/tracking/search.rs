//! MLflow's search filter and order (`metrics.acc > 0.9 and params.lr = '0.1'`,
//! `metrics.acc DESC`): comparisons joined by AND, over metrics (latest value),
//! params, tags and attributes. Parsed once, then tested against each run.

use std::cmp::Ordering;

use super::model::{Experiment, Run};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entity {
    Metric,
    Param,
    Tag,
    Attribute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Like,
    ILike,
    In,
    NotIn,
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Text(String),
    Number(f64),
    List(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
struct Clause {
    entity: Entity,
    key: String,
    op: Op,
    value: Value,
}

/// A parsed filter: every clause must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter(Vec<Clause>);

fn bad(filter: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid("filter", format!("`{filter}`: {why}"))
}

struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn skip_space(&mut self) {
        while self.text[self.at..].starts_with(char::is_whitespace) {
            self.at += self.text[self.at..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
        }
    }

    fn done(&mut self) -> bool {
        self.skip_space();
        self.at >= self.text.len()
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    /// A word of letters, digits, `_` and `.`, or a quoted name.
    fn name(&mut self) -> Option<String> {
        self.skip_space();
        let rest = self.rest();
        if let Some(q @ ('`' | '"')) = rest.chars().next() {
            let end = rest[1..].find(q)?;
            self.at += end + 2;
            return Some(rest[1..=end].to_string());
        }
        let len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        (len > 0).then(|| {
            self.at += len;
            rest[..len].to_string()
        })
    }

    fn keyword(&mut self, word: &str) -> bool {
        self.skip_space();
        let rest = self.rest();
        let matches = rest.len() >= word.len()
            && rest[..word.len()].eq_ignore_ascii_case(word)
            && !rest[word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_');
        if matches {
            self.at += word.len();
        }
        matches
    }

    fn op(&mut self) -> Option<Op> {
        self.skip_space();
        for (text, op) in [
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("=", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ] {
            if self.rest().starts_with(text) {
                self.at += text.len();
                return Some(op);
            }
        }
        if self.keyword("LIKE") {
            return Some(Op::Like);
        }
        if self.keyword("ILIKE") {
            return Some(Op::ILike);
        }
        if self.keyword("IN") {
            return Some(Op::In);
        }
        if self.keyword("NOT") && self.keyword("IN") {
            return Some(Op::NotIn);
        }
        None
    }

    fn string(&mut self) -> Option<String> {
        self.skip_space();
        let rest = self.rest();
        let q @ ('\'' | '"') = rest.chars().next()? else {
            return None;
        };
        let end = rest[1..].find(q)?;
        self.at += end + 2;
        Some(rest[1..=end].to_string())
    }

    fn value(&mut self) -> Option<Value> {
        if let Some(text) = self.string() {
            return Some(Value::Text(text));
        }
        self.skip_space();
        if self.rest().starts_with('(') {
            self.at += 1;
            let mut items = Vec::new();
            loop {
                items.push(self.string()?);
                self.skip_space();
                if self.rest().starts_with(',') {
                    self.at += 1;
                } else if self.rest().starts_with(')') {
                    self.at += 1;
                    return Some(Value::List(items));
                } else {
                    return None;
                }
            }
        }
        let word = self.name()?;
        word.parse().ok().map(Value::Number)
    }
}

/// The entity and key of `metrics.acc`, `params."lr"`, `tags.x`, `attributes.status`
/// or a bare attribute (`run_name`, `status`).
fn split_name(name: &str) -> (Entity, String) {
    if let Some((head, key)) = name.split_once('.') {
        let entity = match head.to_ascii_lowercase().as_str() {
            "metric" | "metrics" => Some(Entity::Metric),
            "param" | "params" | "parameter" | "parameters" => Some(Entity::Param),
            "tag" | "tags" => Some(Entity::Tag),
            "attribute" | "attributes" | "attr" | "run" => Some(Entity::Attribute),
            _ => None,
        };
        if let Some(entity) = entity {
            return (entity, key.trim_matches(['`', '"']).to_string());
        }
    }
    (Entity::Attribute, name.to_string())
}

impl Filter {
    pub fn parse(filter: &str) -> Result<Self> {
        let mut lexer = Lexer {
            text: filter,
            at: 0,
        };
        let mut clauses = Vec::new();
        if lexer.done() {
            return Ok(Filter(clauses));
        }
        loop {
            let name = lexer.name().ok_or_else(|| {
                bad(
                    filter,
                    format!("expected a name such as metrics.acc at `{}`", lexer.rest()),
                )
            })?;
            // `metrics.` followed by a quoted key.
            let name = if name.ends_with('.') {
                let key = lexer
                    .name()
                    .ok_or_else(|| bad(filter, format!("`{name}` needs a key")))?;
                format!("{name}{key}")
            } else {
                name
            };
            let (entity, key) = split_name(&name);
            let op = lexer.op().ok_or_else(|| {
                bad(
                    filter,
                    format!("expected =, !=, <, <=, >, >=, LIKE, ILIKE or IN after `{name}`"),
                )
            })?;
            let value = lexer
                .value()
                .ok_or_else(|| bad(filter, format!("expected a value after `{name}`")))?;
            match (&entity, &op, &value) {
                (Entity::Metric, Op::Like | Op::ILike | Op::In | Op::NotIn, _) => {
                    return Err(bad(
                        filter,
                        "metrics compare as numbers (=, !=, <, <=, >, >=)",
                    ));
                }
                (Entity::Metric, _, Value::Text(_) | Value::List(_)) => {
                    return Err(bad(filter, format!("metrics.{key} compares with a number")));
                }
                (Entity::Metric, _, Value::Number(_))
                | (_, Op::In | Op::NotIn, Value::List(_))
                | (_, _, Value::Text(_)) => {}
                (Entity::Attribute, _, Value::Number(_))
                    if matches!(key.as_str(), "start_time" | "end_time" | "created") => {}
                _ => {
                    return Err(bad(
                        filter,
                        format!("`{name}` compares with a quoted string"),
                    ));
                }
            }
            clauses.push(Clause {
                entity,
                key,
                op,
                value,
            });
            if lexer.done() {
                return Ok(Filter(clauses));
            }
            if !lexer.keyword("AND") {
                return Err(bad(
                    filter,
                    format!("clauses are joined by AND (at `{}`)", lexer.rest()),
                ));
            }
        }
    }

    pub fn matches_run(&self, run: &Run) -> bool {
        self.0.iter().all(|clause| {
            let found = run_field(run, clause.entity, &clause.key);
            compare(found, clause)
        })
    }

    pub fn matches_experiment(&self, experiment: &Experiment) -> bool {
        self.0.iter().all(|clause| {
            let found = match clause.entity {
                Entity::Tag => experiment
                    .tags
                    .iter()
                    .find(|t| t.key == clause.key)
                    .map(|t| Field::Text(t.value.clone())),
                Entity::Attribute => match clause.key.as_str() {
                    "name" => Some(Field::Text(experiment.name.clone())),
                    "creation_time" | "created" => {
                        Some(Field::Number(experiment.creation_time as f64))
                    }
                    "last_update_time" => Some(Field::Number(experiment.last_update_time as f64)),
                    _ => None,
                },
                _ => None,
            };
            compare(found, clause)
        })
    }
}

enum Field {
    Text(String),
    Number(f64),
}

fn run_field(run: &Run, entity: Entity, key: &str) -> Option<Field> {
    let pair = |list: &[super::model::Tag]| {
        list.iter()
            .find(|t| t.key == key)
            .map(|t| Field::Text(t.value.clone()))
    };
    match entity {
        Entity::Metric => run
            .data
            .metrics
            .iter()
            .find(|m| m.key == key)
            .map(|m| Field::Number(m.value)),
        Entity::Param => pair(&run.data.params),
        Entity::Tag => pair(&run.data.tags),
        Entity::Attribute => {
            let info = &run.info;
            Some(match key {
                "run_id" | "run_uuid" => Field::Text(info.run_id.clone()),
                "run_name" => Field::Text(info.run_name.clone()),
                "status" => Field::Text(info.status.clone()),
                "user_id" => Field::Text(info.user_id.clone()),
                "artifact_uri" => Field::Text(info.artifact_uri.clone()),
                "lifecycle_stage" => Field::Text(info.lifecycle_stage.clone()),
                "experiment_id" => Field::Text(info.experiment_id.clone()),
                "start_time" | "created" => Field::Number(info.start_time as f64),
                "end_time" => Field::Number(info.end_time? as f64),
                _ => return None,
            })
        }
    }
}

/// SQL's LIKE: `%` any run of characters, `_` any one.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    // Classic two-pointer wildcard match with backtracking to the last `%`.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '_' || pattern[p] == text[t]) {
            t += 1;
            p += 1;
        } else if p < pattern.len() && pattern[p] == '%' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '%')
}

fn compare(found: Option<Field>, clause: &Clause) -> bool {
    let Some(found) = found else {
        // A run without the key matches only "not equal"-like tests of nothing.
        return false;
    };
    let order = match (&found, &clause.value) {
        (Field::Number(a), Value::Number(b)) => a.partial_cmp(b),
        (Field::Number(a), Value::Text(b)) => b.parse::<f64>().ok().and_then(|b| a.partial_cmp(&b)),
        (Field::Text(a), Value::Text(b)) => match clause.op {
            Op::Like => return like(a, b),
            Op::ILike => return like(&a.to_lowercase(), &b.to_lowercase()),
            _ => Some(a.as_str().cmp(b.as_str())),
        },
        (Field::Text(a), Value::List(items)) => {
            let inside = items.iter().any(|i| i == a);
            return if clause.op == Op::NotIn {
                !inside
            } else {
                inside
            };
        }
        (Field::Text(a), Value::Number(b)) => a.parse::<f64>().ok().and_then(|a| a.partial_cmp(b)),
        (Field::Number(_), Value::List(_)) => None,
    };
    let Some(order) = order else {
        return clause.op == Op::Ne;
    };
    match clause.op {
        Op::Eq => order == Ordering::Equal,
        Op::Ne => order != Ordering::Equal,
        Op::Lt => order == Ordering::Less,
        Op::Le => order != Ordering::Greater,
        Op::Gt => order == Ordering::Greater,
        Op::Ge => order != Ordering::Less,
        Op::Like | Op::ILike | Op::In | Op::NotIn => false,
    }
}

/// Sorts runs by `order_by` (`metrics.acc DESC`, `attributes.start_time`...);
/// runs without the key go last; ties, and no order given, newest first.
pub fn sort_runs(runs: &mut [Run], order_by: &[String]) -> Result<()> {
    let mut keys = Vec::new();
    for item in order_by {
        let mut words = item.split_whitespace();
        let name = words
            .next()
            .ok_or_else(|| Error::invalid("order_by", "an empty order"))?;
        let descending = match words.next().map(str::to_ascii_uppercase).as_deref() {
            None | Some("ASC") => false,
            Some("DESC") => true,
            Some(other) => {
                return Err(Error::invalid(
                    "order_by",
                    format!("`{item}`: `{other}` is not ASC or DESC"),
                ));
            }
        };
        let (entity, key) = split_name(name.trim_matches('`'));
        keys.push((entity, key, descending));
    }
    runs.sort_by(|a, b| {
        for (entity, key, descending) in &keys {
            let (x, y) = (run_field(a, *entity, key), run_field(b, *entity, key));
            let order = match (x, y) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => return Ordering::Greater,
                (Some(_), None) => return Ordering::Less,
                (Some(Field::Number(x)), Some(Field::Number(y))) => {
                    x.partial_cmp(&y).unwrap_or(Ordering::Equal)
                }
                (Some(Field::Text(x)), Some(Field::Text(y))) => x.cmp(&y),
                _ => Ordering::Equal,
            };
            let order = if *descending { order.reverse() } else { order };
            if order != Ordering::Equal {
                return order;
            }
        }
        b.info
            .start_time
            .cmp(&a.info.start_time)
            .then_with(|| a.info.run_id.cmp(&b.info.run_id))
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::model::{Metric, RunData, RunInfo, Tag};

    fn run(id: &str, acc: Option<f64>, lr: &str, start: i64) -> Run {
        Run {
            info: RunInfo {
                run_id: id.into(),
                run_uuid: id.into(),
                run_name: format!("name-{id}"),
                experiment_id: "0".into(),
                user_id: String::new(),
                status: "FINISHED".into(),
                start_time: start,
                end_time: None,
                artifact_uri: String::new(),
                lifecycle_stage: "active".into(),
            },
            data: RunData {
                metrics: acc
                    .map(|v| Metric {
                        key: "acc".into(),
                        value: v,
                        timestamp: 0,
                        step: 0,
                    })
                    .into_iter()
                    .collect(),
                params: vec![Tag {
                    key: "lr".into(),
                    value: lr.into(),
                }],
                tags: vec![Tag {
                    key: "mlflow.runName".into(),
                    value: format!("name-{id}"),
                }],
            },
            inputs: serde_json::json!({}),
            outputs: serde_json::json!({}),
        }
    }

    #[test]
    fn filters_compare_metrics_as_numbers_and_the_rest_as_text() {
        let runs = [
            run("a", Some(0.9), "0.1", 1),
            run("b", Some(0.5), "0.01", 2),
            run("c", None, "0.1", 3),
        ];
        let pick = |f: &str| -> Vec<String> {
            let filter = Filter::parse(f).expect(f);
            runs.iter()
                .filter(|r| filter.matches_run(r))
                .map(|r| r.info.run_id.clone())
                .collect()
        };
        assert_eq!(pick("metrics.acc > 0.6"), ["a"]);
        assert_eq!(pick("metrics.acc < 0.6"), ["b"]);
        assert_eq!(pick("metrics.acc >= 0.5 and params.lr = '0.01'"), ["b"]);
        assert_eq!(pick("params.lr = \"0.1\""), ["a", "c"]);
        assert_eq!(pick("tags.`mlflow.runName` LIKE 'name-%'"), ["a", "b", "c"]);
        assert_eq!(pick("attributes.run_name ILIKE 'NAME-B'"), ["b"]);
        assert_eq!(pick("run_id IN ('a', 'c')"), ["a", "c"]);
        assert_eq!(pick("attributes.status != 'RUNNING'").len(), 3);
        assert_eq!(pick(""), ["a", "b", "c"]);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (filter, says) in [
            ("metrics.acc > 'x'", "number"),
            ("metrics.acc LIKE 1", "numbers"),
            ("params.lr = 1", "quoted"),
            ("params.lr ~ '1'", "expected ="),
            ("metrics.acc > 1 or metrics.acc < 0", "AND"),
            ("metrics.acc >", "value"),
        ] {
            let err = Filter::parse(filter).expect_err(filter).to_string();
            assert!(err.contains(says), "{filter}: {err}");
        }
    }

    #[test]
    fn order_puts_runs_without_the_key_last() {
        let mut runs = vec![
            run("a", Some(0.5), "1", 1),
            run("b", None, "1", 2),
            run("c", Some(0.9), "1", 3),
        ];
        sort_runs(&mut runs, &["metrics.acc DESC".into()]).expect("sort");
        let ids: Vec<_> = runs.iter().map(|r| r.info.run_id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
        sort_runs(&mut runs, &[]).expect("sort");
        let ids: Vec<_> = runs.iter().map(|r| r.info.run_id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "a"], "newest first by default");
        assert!(sort_runs(&mut runs, &["metrics.acc UP".into()]).is_err());
    }

    #[test]
    fn like_matches_sql_wildcards() {
        assert!(like("abc", "a%"));
        assert!(like("abc", "%c"));
        assert!(like("abc", "a_c"));
        assert!(!like("abc", "a_"));
        assert!(like("", "%"));
        assert!(like("a%b", "a%b"));
    }
}
