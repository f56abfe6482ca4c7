//! Pipeline job files (`type: pipeline`): the service's pipelineJob schema read
//! into a draft per step. Each step is a command job checked by `draft` as if it
//! were submitted alone, once its bindings are settled: `${{parent.inputs.X}}`
//! puts the pipeline's input in, `${{parent.outputs.Y}}` makes the step's output
//! the pipeline's, and `${{parent.jobs.S.outputs.Z}}` makes it read step S's
//! output (the graph). Unknown steps and outputs, unbound inputs and cycles are
//! refused here, naming the key; steps come out in an order where each follows
//! the steps it reads from.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::{Draft, LocalPath, check_io_name, text_field};
use crate::model::StepOutput;
use crate::{Error, Result};

/// A pipeline job file, read and checked; its steps' references not yet resolved.
#[derive(Debug)]
pub struct PipelineDraft {
    pub display_name: Option<String>,
    pub experiment_name: Option<String>,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    /// The pipeline's compute (`compute`, else `settings.default_compute`).
    pub compute: Option<String>,
    pub continue_on_step_failure: bool,
    /// Steps, each after those it reads from.
    pub steps: Vec<StepDraft>,
    /// Each pipeline output: the step output bound to it.
    pub outputs: BTreeMap<String, StepOutput>,
    pub warnings: Vec<String>,
}

#[derive(Debug)]
pub struct StepDraft {
    pub name: String,
    pub draft: Draft,
    /// Indexes of the steps it reads from (each before it).
    pub after: Vec<u32>,
}

const TOP_KEYS: &[&str] = &[
    "$schema",
    "type",
    "name",
    "display_name",
    "experiment_name",
    "description",
    "tags",
    "properties",
    "compute",
    "settings",
    "inputs",
    "outputs",
    "jobs",
    "identity",
];

/// A binding written alone: `${{parent.inputs.X}}` → ("inputs", "X").
fn binding(text: &str) -> Option<Vec<&str>> {
    let inner = text
        .trim()
        .strip_prefix("${{")?
        .strip_suffix("}}")?
        .trim()
        .strip_prefix("parent.")?;
    Some(inner.split('.').collect())
}

/// `${{parent.jobs.S.outputs.Z}}` → (S, Z).
pub fn step_binding(text: &str) -> Option<(String, String)> {
    match binding(text)?.as_slice() {
        ["jobs", step, "outputs", output] => Some((step.to_string(), output.to_string())),
        _ => None,
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn text_map(value: Option<&Value>, field: &str) -> Result<BTreeMap<String, String>> {
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                scalar_text(v)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| Error::invalid(format!("{field}.{k}"), "is not text"))
            })
            .collect(),
        Some(_) => Err(Error::invalid(field, "is a mapping of names to text")),
    }
}

fn object<'a>(value: Option<&'a Value>, field: &str) -> Result<Option<&'a Map<String, Value>>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(Error::invalid(field, "is a mapping")),
    }
}

/// Reads a pipeline job file (with `--set` applied already).
pub fn draft_pipeline(doc: Value) -> Result<PipelineDraft> {
    let Value::Object(top) = doc else {
        return Err(Error::invalid("job file", "it must be a mapping of keys"));
    };
    let mut warnings = Vec::new();
    for key in top.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            return Err(Error::invalid(
                key,
                "unknown key for a pipeline; it has jobs, inputs, outputs, settings, compute (and display_name, experiment_name, description, tags)",
            ));
        }
    }
    if top.contains_key("identity") {
        warnings.push(
            "identity: steps get tokens for their cluster's managed identity (IDENTITY_ENDPOINT); a job-level identity has no effect here".into(),
        );
    }
    let mut compute = text_field(&top, "compute", "compute")?.map(str::to_string);
    let mut continue_on_step_failure = false;
    if let Some(settings) = object(top.get("settings"), "settings")? {
        for (key, value) in settings {
            let field = format!("settings.{key}");
            match key.as_str() {
                "default_compute" => {
                    if compute.is_none() {
                        compute = text_field(settings, key, &field)?.map(str::to_string);
                    }
                }
                "continue_on_step_failure" => {
                    continue_on_step_failure = value.as_bool().ok_or_else(|| {
                        Error::invalid(&field, "is true or false")
                    })?;
                }
                "force_rerun" => {
                    value
                        .as_bool()
                        .ok_or_else(|| Error::invalid(&field, "is true or false"))?;
                }
                "default_datastore" => warnings.push(
                    "settings.default_datastore: step outputs are kept by the coordinator (give an output a datastore `path` to write it there too)".into(),
                ),
                "default_environment" | "on_init" | "on_finalize" => {
                    warnings.push(format!("{field}: has no effect here"))
                }
                other => {
                    return Err(Error::invalid(
                        format!("settings.{other}"),
                        "unknown setting; a pipeline's settings are default_compute, default_datastore, continue_on_step_failure and force_rerun",
                    ));
                }
            }
        }
    }
    let compute = compute
        .map(|c| c.trim().trim_start_matches("azureml:").to_string())
        .filter(|c| !c.is_empty());
    let inputs = object(top.get("inputs"), "inputs")?
        .cloned()
        .unwrap_or_default();
    for name in inputs.keys() {
        check_io_name("inputs", name)?;
    }
    let outputs = object(top.get("outputs"), "outputs")?
        .cloned()
        .unwrap_or_default();
    for name in outputs.keys() {
        check_io_name("outputs", name)?;
    }
    let Some(jobs) = object(top.get("jobs"), "jobs")? else {
        return Err(Error::invalid(
            "jobs",
            "a pipeline needs its steps: jobs: {prep: {type: command, command: ..., outputs: {data: }}, train: {...}}",
        ));
    };
    if jobs.is_empty() {
        return Err(Error::invalid("jobs", "a pipeline needs at least one step"));
    }
    // Each step's document with the pipeline's inputs and outputs put in, and what it reads.
    let mut docs: Vec<(String, Value, BTreeSet<String>)> = Vec::new();
    let mut bound_outputs: BTreeMap<String, StepOutput> = BTreeMap::new();
    let experiment = text_field(&top, "experiment_name", "experiment_name")?;
    for (name, step) in jobs {
        check_io_name("jobs", name)?;
        let field = format!("jobs.{name}");
        let Value::Object(step) = step else {
            return Err(Error::invalid(
                &field,
                "a step is a job: {type: command, command: ...}",
            ));
        };
        let mut step = step.clone();
        if let Some(component) = step.get("component") {
            return Err(Error::invalid(
                format!("{field}.component"),
                format!(
                    "`{}`: components are not read here yet; write the step inline (type: command, command, code, environment, inputs, outputs)",
                    scalar_text(component).unwrap_or_default()
                ),
            ));
        }
        match step
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("command")
        {
            "command" => {}
            "parallel" | "sweep" => {
                return Err(Error::invalid(
                    format!("{field}.type"),
                    format!(
                        "`{}` steps do not run inside pipelines here yet; a pipeline's steps are command jobs (submit the {} as its own job)",
                        step["type"].as_str().unwrap_or_default(),
                        step["type"].as_str().unwrap_or_default()
                    ),
                ));
            }
            other => {
                return Err(Error::invalid(
                    format!("{field}.type"),
                    format!("`{other}` is not a step type; a pipeline's steps are command jobs"),
                ));
            }
        }
        let mut reads = BTreeSet::new();
        if let Some(Value::Object(step_inputs)) = step.get_mut("inputs") {
            for (input, value) in step_inputs.iter_mut() {
                let at = format!("{field}.inputs.{input}");
                bind_input(value, &inputs, &at, &mut reads)?;
            }
        }
        if let Some(Value::Object(step_outputs)) = step.get_mut("outputs") {
            for (output, value) in step_outputs.iter_mut() {
                let at = format!("{field}.outputs.{output}");
                let Some(text) = value.as_str() else {
                    continue;
                };
                match binding(text).as_deref() {
                    Some(["outputs", parent]) => {
                        let Some(decl) = outputs.get(*parent) else {
                            return Err(Error::invalid(
                                &at,
                                format!("`{text}`: the pipeline has no output `{parent}`"),
                            ));
                        };
                        if let Some(other) = bound_outputs.get(*parent) {
                            return Err(Error::invalid(
                                &at,
                                format!(
                                    "pipeline output `{parent}` is already step `{}`'s output `{}`",
                                    other.step, other.output
                                ),
                            ));
                        }
                        bound_outputs.insert(
                            parent.to_string(),
                            StepOutput {
                                step: name.clone(),
                                output: output.clone(),
                            },
                        );
                        *value = decl.clone();
                    }
                    _ => {
                        return Err(Error::invalid(
                            &at,
                            format!(
                                "`{text}`: a step's output is {{type, mode, path}}, nothing, or ${{{{parent.outputs.NAME}}}}"
                            ),
                        ));
                    }
                }
            }
        }
        if !step.contains_key("compute")
            && let Some(compute) = &compute
        {
            step.insert("compute".into(), Value::String(compute.clone()));
        }
        if !step.contains_key("experiment_name")
            && let Some(experiment) = experiment
        {
            step.insert("experiment_name".into(), Value::String(experiment.into()));
        }
        docs.push((name.clone(), Value::Object(step), reads));
    }
    if let Some(unbound) = outputs.keys().find(|o| !bound_outputs.contains_key(*o)) {
        return Err(Error::invalid(
            format!("outputs.{unbound}"),
            "no step writes it; bind a step's output to it: outputs: {NAME: ${{parent.outputs."
                .to_string()
                + unbound
                + "}}}",
        ));
    }
    // The graph: each read names a step and one of its outputs, and no cycle.
    let names: Vec<String> = docs.iter().map(|(n, _, _)| n.clone()).collect();
    let mut drafted: BTreeMap<String, Draft> = BTreeMap::new();
    for (name, doc, _) in &docs {
        let draft =
            super::draft_step(doc.clone()).map_err(|e| e.in_field(&format!("jobs.{name}")))?;
        drafted.insert(name.clone(), draft);
    }
    for (name, _, reads) in &docs {
        for read in reads {
            let (step, output) = read.split_once('.').unwrap_or((read, ""));
            let Some(producer) = drafted.get(step) else {
                return Err(Error::invalid(
                    format!("jobs.{name}.inputs"),
                    format!(
                        "`${{{{parent.jobs.{step}.outputs.{output}}}}}` names no step `{step}`; the steps are {}",
                        names.join(", ")
                    ),
                ));
            };
            if !producer.outputs.contains_key(output) {
                return Err(Error::invalid(
                    format!("jobs.{name}.inputs"),
                    format!("step `{step}` has no output `{output}`; declare it in its outputs"),
                ));
            }
        }
    }
    let order = topological(&docs)?;
    let position: BTreeMap<&str, u32> = order
        .iter()
        .enumerate()
        .map(|(i, &d)| (docs[d].0.as_str(), i as u32))
        .collect();
    let mut steps = Vec::with_capacity(order.len());
    for d in order {
        let (name, _, reads) = &docs[d];
        let mut after: Vec<u32> = reads
            .iter()
            .map(|r| position[r.split_once('.').map_or(r.as_str(), |(s, _)| s)])
            .collect();
        after.sort_unstable();
        after.dedup();
        let draft = drafted.remove(name).expect("drafted above");
        warnings.extend(draft.warnings.iter().map(|w| format!("jobs.{name}.{w}")));
        steps.push(StepDraft {
            name: name.clone(),
            draft,
            after,
        });
    }
    Ok(PipelineDraft {
        display_name: text_field(&top, "display_name", "display_name")?.map(str::to_string),
        experiment_name: experiment.map(str::to_string),
        description: text_field(&top, "description", "description")?.map(str::to_string),
        tags: text_map(top.get("tags"), "tags")?,
        properties: text_map(top.get("properties"), "properties")?,
        compute,
        continue_on_step_failure,
        steps,
        outputs: bound_outputs,
        warnings,
    })
}

/// One step input with its binding settled: the pipeline's input put in, or a
/// read of another step's output noted (`reads` gets `STEP.OUTPUT`).
fn bind_input(
    value: &mut Value,
    inputs: &Map<String, Value>,
    field: &str,
    reads: &mut BTreeSet<String>,
) -> Result<()> {
    let parent_input = |name: &str| {
        inputs.get(name).cloned().ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "`${{{{parent.inputs.{name}}}}}` is unbound: the pipeline has no input `{name}`"
                ),
            )
        })
    };
    match value {
        Value::String(text) if text.contains("${{parent.") => match binding(text).as_deref() {
            Some(["inputs", name]) => *value = parent_input(name)?,
            Some(["jobs", step, "outputs", output]) => {
                reads.insert(format!("{step}.{output}"));
                let path = text.clone();
                *value = serde_json::json!({"type": "uri_folder", "path": path});
            }
            _ => {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{text}`: a binding is ${{{{parent.inputs.NAME}}}} or ${{{{parent.jobs.STEP.outputs.NAME}}}}"
                    ),
                ));
            }
        },
        Value::Object(map) => {
            let Some(Value::String(path)) = map.get("path").cloned() else {
                return Ok(());
            };
            if !path.contains("${{parent.") {
                return Ok(());
            }
            match binding(&path).as_deref() {
                Some(["inputs", name]) => match parent_input(name)? {
                    Value::Object(parent) => {
                        for (key, v) in parent {
                            if key == "path" || !map.contains_key(&key) {
                                map.insert(key, v);
                            }
                        }
                    }
                    other => {
                        map.insert("path".into(), other);
                    }
                },
                Some(["jobs", step, "outputs", output]) => {
                    reads.insert(format!("{step}.{output}"));
                }
                _ => {
                    return Err(Error::invalid(
                        format!("{field}.path"),
                        format!(
                            "`{path}`: a binding is ${{{{parent.inputs.NAME}}}} or ${{{{parent.jobs.STEP.outputs.NAME}}}}"
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The steps in an order where each follows those it reads from (ties in the
/// file's order); a cycle is refused, naming its steps.
fn topological(docs: &[(String, Value, BTreeSet<String>)]) -> Result<Vec<usize>> {
    let index: BTreeMap<&str, usize> = docs
        .iter()
        .enumerate()
        .map(|(i, (n, _, _))| (n.as_str(), i))
        .collect();
    let deps: Vec<BTreeSet<usize>> = docs
        .iter()
        .map(|(_, _, reads)| {
            reads
                .iter()
                .filter_map(|r| index.get(r.split_once('.').map_or(r.as_str(), |(s, _)| s)))
                .copied()
                .collect()
        })
        .collect();
    let mut done = vec![false; docs.len()];
    let mut order = Vec::with_capacity(docs.len());
    while order.len() < docs.len() {
        let next = (0..docs.len()).find(|&i| !done[i] && deps[i].iter().all(|&d| done[d]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(i);
            }
            None => {
                let stuck: Vec<&str> = (0..docs.len())
                    .filter(|&i| !done[i])
                    .map(|i| docs[i].0.as_str())
                    .collect();
                return Err(Error::invalid(
                    "jobs",
                    format!(
                        "the steps {} read each other's outputs in a cycle; a step can only read steps that run before it",
                        stuck.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(order)
}

/// The local paths a pipeline names: each step's, its field under `jobs.STEP`.
pub fn local_paths(pipeline: &PipelineDraft) -> Vec<LocalPath> {
    pipeline
        .steps
        .iter()
        .flat_map(|step| {
            super::local_paths(&step.draft)
                .into_iter()
                .map(move |p| LocalPath {
                    field: format!("jobs.{}.{}", step.name, p.field),
                    ..p
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<PipelineDraft> {
        draft_pipeline(super::super::jobfile::document(text).expect("yaml"))
    }

    const THREE: &str = "type: pipeline
compute: azureml:cpu
settings: {continue_on_step_failure: true}
inputs:
  raw: {type: uri_folder, path: ./data}
  rate: 0.5
outputs:
  report:
jobs:
  summarize:
    command: cat ${{inputs.scores}}/* > ${{outputs.report}}/all.txt
    inputs: {scores: '${{parent.jobs.score.outputs.scores}}'}
    outputs: {report: '${{parent.outputs.report}}'}
  prep:
    command: cp -r ${{inputs.raw}} ${{outputs.clean}} --rate ${{inputs.rate}}
    code: ./src
    inputs: {raw: '${{parent.inputs.raw}}', rate: '${{parent.inputs.rate}}'}
    outputs: {clean: }
  score:
    command: ls ${{inputs.clean}} > ${{outputs.scores}}/list
    inputs:
      clean: {type: uri_folder, path: '${{parent.jobs.prep.outputs.clean}}'}
    outputs: {scores: }
";

    #[test]
    fn a_pipeline_is_read_into_steps_in_the_order_they_read_each_other() {
        let p = read(THREE).expect("accepted");
        let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["prep", "score", "summarize"]);
        assert_eq!(p.steps[0].after, Vec::<u32>::new());
        assert_eq!(p.steps[1].after, vec![0]);
        assert_eq!(p.steps[2].after, vec![1]);
        assert!(p.continue_on_step_failure);
        assert_eq!(p.compute.as_deref(), Some("cpu"));
        assert_eq!(p.steps[0].draft.compute.as_deref(), Some("cpu"));
        assert_eq!(p.steps[0].draft.literals["rate"], "0.5");
        assert_eq!(
            p.steps[0].draft.inputs["raw"].path,
            super::super::DataRef::Local("./data".into())
        );
        assert_eq!(
            p.steps[1].draft.inputs["clean"].path,
            super::super::DataRef::Step {
                step: "prep".into(),
                output: "clean".into()
            }
        );
        assert_eq!(
            p.outputs["report"],
            StepOutput {
                step: "summarize".into(),
                output: "report".into()
            }
        );
        let fields: Vec<String> = local_paths(&p).into_iter().map(|l| l.field).collect();
        assert_eq!(fields, ["jobs.prep.code", "jobs.prep.inputs.raw.path"]);
    }

    #[test]
    fn cycles_unknown_steps_and_unbound_inputs_are_refused_naming_them() {
        let refused = |text: &str| read(text).unwrap_err().to_string();
        let cycle = refused(
            "type: pipeline\njobs:\n  a: {command: x, inputs: {i: '${{parent.jobs.b.outputs.o}}'}, outputs: {o: }}\n  b: {command: x, inputs: {i: '${{parent.jobs.a.outputs.o}}'}, outputs: {o: }}\n",
        );
        assert!(cycle.contains("a, b") && cycle.contains("cycle"), "{cycle}");
        let unknown = refused(
            "type: pipeline\njobs:\n  a: {command: x, inputs: {i: '${{parent.jobs.nope.outputs.o}}'}}\n",
        );
        assert!(unknown.contains("names no step `nope`"), "{unknown}");
        let no_output = refused(
            "type: pipeline\njobs:\n  a: {command: x, outputs: {o: }}\n  b: {command: x, inputs: {i: '${{parent.jobs.a.outputs.p}}'}}\n",
        );
        assert!(
            no_output.contains("step `a` has no output `p`"),
            "{no_output}"
        );
        let unbound = refused(
            "type: pipeline\njobs:\n  a: {command: x, inputs: {i: '${{parent.inputs.lr}}'}}\n",
        );
        assert!(
            unbound.contains("unbound") && unbound.contains("jobs.a.inputs.i"),
            "{unbound}"
        );
        let in_command = refused("type: pipeline\njobs:\n  a: {command: 'echo ${{inputs.zz}}'}\n");
        assert!(
            in_command.contains("jobs.a") && in_command.contains("zz"),
            "{in_command}"
        );
        assert!(refused("type: pipeline\njobs: {}\n").contains("at least one step"));
        assert!(
            refused("type: pipeline\njobs:\n  a: {component: ./c.yml}\n").contains("components")
        );
        assert!(
            refused("type: pipeline\noutputs: {r: }\njobs:\n  a: {command: x}\n")
                .contains("no step writes it")
        );
        assert!(
            refused("type: pipeline\nsettings: {retries: 2}\njobs:\n  a: {command: x}\n")
                .contains("settings.retries")
        );
    }

    #[test]
    fn a_command_job_cannot_read_a_step() {
        let doc = super::super::jobfile::document(
            "command: x\ninputs: {i: {type: uri_folder, path: '${{parent.jobs.a.outputs.o}}'}}\n",
        )
        .expect("yaml");
        let err = super::super::draft(doc, &[]).unwrap_err().to_string();
        assert!(err.contains("only inside a pipeline"), "{err}");
    }
}
