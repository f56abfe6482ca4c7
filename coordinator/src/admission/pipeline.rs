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
    /// Every step runs, even one identical to a completed earlier step.
    pub force_rerun: bool,
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
    /// Its component does not say `is_deterministic: false`: an identical
    /// completed run may stand for it.
    pub deterministic: bool,
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
    let mut force_rerun = false;
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
                    force_rerun = value
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
    let mut not_deterministic: BTreeSet<String> = BTreeSet::new();
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
        let component = match step.remove("component") {
            None => None,
            Some(Value::Object(component)) => Some(component),
            Some(other) => {
                let written = scalar_text(&other).unwrap_or_default();
                let why = if written.starts_with("azureml:") {
                    "registered components are not kept here yet; give the component's file (component: ./train.yml) or write it inline"
                } else {
                    "a component file is read by `shoal job submit -f` (the CLI puts it in); over HTTP write the component inline: component: {type: command, command: ..., inputs: ...}"
                };
                return Err(Error::invalid(
                    format!("{field}.component"),
                    format!("`{written}`: {why}"),
                ));
            }
        };
        match step
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("command")
        {
            "command" => {}
            "sweep" if component.is_none() => {}
            "sweep" => {
                return Err(Error::invalid(
                    format!("{field}.component"),
                    "a sweep step's trial is written inline here: trial: {command: ..., code: ...}",
                ));
            }
            "parallel" => {}
            other => {
                return Err(Error::invalid(
                    format!("{field}.type"),
                    format!(
                        "`{other}` is not a step type; a pipeline's steps are command, sweep and parallel jobs"
                    ),
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
        if let Some(component) = component {
            if component.get("is_deterministic").and_then(Value::as_bool) == Some(false) {
                not_deterministic.insert(name.clone());
            }
            apply_component(&mut step, component, &field, &mut warnings)?;
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
            deterministic: !not_deterministic.contains(name),
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
        force_rerun,
        steps,
        outputs: bound_outputs,
        warnings,
    })
}

/// The keys a command component (the commandComponent schema) gives its step.
const COMPONENT_KEYS: &[&str] = &[
    "command",
    "code",
    "environment",
    "distribution",
    "resources",
    "environment_variables",
];

/// The keys a parallel component (the parallelComponent schema) gives its step.
const PARALLEL_COMPONENT_KEYS: &[&str] = &[
    "task",
    "input_data",
    "mini_batch_size",
    "resources",
    "max_concurrency_per_instance",
    "error_threshold",
    "mini_batch_error_threshold",
    "logging_level",
    "retry_settings",
    "partition_keys",
    "environment_variables",
];

/// A parallel component's settings a step may give itself (the step's win).
const STEP_TUNES: &[&str] = &[
    "mini_batch_size",
    "max_concurrency_per_instance",
    "error_threshold",
    "mini_batch_error_threshold",
    "logging_level",
    "retry_settings",
];

/// Where a job file names components: a pipeline's steps' `component` (and a
/// sweep step's `trial`), a sweep's own `trial`; each slot with its field.
pub fn component_slots(doc: &mut Value) -> Vec<(String, &mut Value)> {
    let mut slots = Vec::new();
    let Value::Object(map) = doc else {
        return slots;
    };
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "trial" => slots.push(("trial".to_string(), value)),
            "jobs" => {
                if let Value::Object(steps) = value {
                    for (name, step) in steps.iter_mut() {
                        if let Value::Object(step) = step {
                            for (key, value) in step.iter_mut() {
                                if key == "component" || key == "trial" {
                                    slots.push((format!("jobs.{name}.{key}"), value));
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    slots
}

/// Where a component's code folder is named: a parallel one's `task.code`, a
/// command one's `code`.
pub fn component_code_slot(component: &mut Map<String, Value>) -> Option<&mut Value> {
    if component.get("type").and_then(Value::as_str) == Some("parallel") {
        component.get_mut("task")?.as_object_mut()?.get_mut("code")
    } else {
        component.get_mut("code")
    }
}

/// Data types an input may have; the others are literals.
fn is_data_type(kind: &str) -> bool {
    matches!(
        kind,
        "uri_file" | "uri_folder" | "mltable" | "mlflow_model" | "custom_model"
    )
}

/// A step made of a component (the commandComponent schema, its file inlined by the
/// CLI): the component's command, code, environment, distribution and resources, its
/// typed inputs given the step's values (bindings settled already), their defaults,
/// or left out when optional; its outputs, bound where the step says.
pub(crate) fn apply_component(
    step: &mut Map<String, Value>,
    component: Map<String, Value>,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let at = format!("{field}.component");
    let name = component
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("the component")
        .to_string();
    let parallel = component.get("type").and_then(Value::as_str) == Some("parallel");
    let keys = if parallel {
        PARALLEL_COMPONENT_KEYS
    } else {
        COMPONENT_KEYS
    };
    let step_type = step
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or(if parallel { "parallel" } else { "command" });
    let fits = match step_type {
        "parallel" => parallel,
        "command" | "sweep" => !parallel,
        _ => false,
    };
    if !fits {
        return Err(Error::invalid(
            format!("{field}.type"),
            format!("`{step_type}`: component `{name}` is not of that type"),
        ));
    }
    if parallel {
        step.insert("type".into(), Value::String("parallel".into()));
    }
    for (key, value) in &component {
        match key.as_str() {
            "$schema" | "name" | "version" | "display_name" | "description" | "tags" | "inputs"
            | "outputs" => {}
            "type" => {
                if !matches!(value.as_str(), Some("command" | "parallel")) {
                    return Err(Error::invalid(
                        format!("{at}.type"),
                        format!(
                            "`{}` components do not run here yet; a step's component is `type: command` or `type: parallel`",
                            scalar_text(value).unwrap_or_default()
                        ),
                    ));
                }
            }
            key if parallel && STEP_TUNES.contains(&key) => {
                step.entry(key.to_string()).or_insert_with(|| value.clone());
            }
            "is_deterministic" => {}
            "additional_includes" => warnings.push(format!(
                "{at}.additional_includes: not read here; put what the step needs in its code folder"
            )),
            key if keys.contains(&key) => match (step.get_mut(key), value) {
                // The step's resources and variables add to the component's.
                (Some(Value::Object(mine)), Value::Object(theirs))
                    if key == "resources" || key == "environment_variables" =>
                {
                    for (k, v) in theirs {
                        mine.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                (Some(_), _) => {
                    return Err(Error::invalid(
                        format!("{field}.{key}"),
                        format!("is the component's (`{name}`); give it there, not in the step"),
                    ));
                }
                (None, _) => {
                    step.insert(key.to_string(), value.clone());
                }
            },
            other => {
                return Err(Error::invalid(
                    format!("{at}.{other}"),
                    if parallel {
                        "unknown key for a parallel component; it has name, version, display_name, description, tags, inputs, outputs, input_data, mini_batch_size, resources, max_concurrency_per_instance, error_threshold, mini_batch_error_threshold, logging_level, retry_settings, partition_keys, task"
                    } else {
                        "unknown key for a command component; it has name, version, display_name, description, tags, inputs, outputs, command, code, environment, distribution, resources"
                    },
                ));
            }
        }
    }
    // Inputs: each declared one gets the step's value, its default, or nothing if optional.
    let declared = object(component.get("inputs"), &format!("{at}.inputs"))?
        .cloned()
        .unwrap_or_default();
    let mut given = match step.remove("inputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(Error::invalid(format!("{field}.inputs"), "is a mapping")),
    };
    if let Some(extra) = given.keys().find(|k| !declared.contains_key(*k)) {
        return Err(Error::invalid(
            format!("{field}.inputs.{extra}"),
            format!(
                "component `{name}` has no input `{extra}`; it has {}",
                declared.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let mut inputs = Map::new();
    for (input, decl) in &declared {
        let decl_at = format!("{at}.inputs.{input}");
        let Value::Object(decl) = decl else {
            return Err(Error::invalid(
                &decl_at,
                "an input is {type, default, optional}",
            ));
        };
        let kind = decl
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("uri_folder");
        let optional = decl
            .get("optional")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let value = match (given.remove(input), decl.get("default")) {
            (Some(value), _) => value,
            (None, Some(default)) => default.clone(),
            (None, None) if optional => continue,
            (None, None) => {
                return Err(Error::invalid(
                    format!("{field}.inputs.{input}"),
                    format!(
                        "component `{name}`'s input `{input}` is unbound: give it a value or a binding in the step (it has no default and is not optional)"
                    ),
                ));
            }
        };
        let value = if is_data_type(kind) {
            match value {
                Value::String(path) => serde_json::json!({"type": kind, "path": path}),
                Value::Object(mut map) => {
                    map.entry("type")
                        .or_insert_with(|| Value::String(kind.into()));
                    if let Some(mode) = decl.get("mode") {
                        map.entry("mode").or_insert_with(|| mode.clone());
                    }
                    Value::Object(map)
                }
                other => {
                    return Err(Error::invalid(
                        format!("{field}.inputs.{input}"),
                        format!("`{other}`: `{input}` is {kind} data: give a path or a binding"),
                    ));
                }
            }
        } else if value
            .as_str()
            .is_some_and(|v| v.trim_start().starts_with("${{search_space."))
        {
            value // a sweep's trial: each trial puts its value in
        } else {
            check_literal(&value, kind, decl, &format!("{field}.inputs.{input}"))?;
            value
        };
        inputs.insert(input.clone(), value);
    }
    if !inputs.is_empty() {
        step.insert("inputs".into(), Value::Object(inputs));
    }
    // Outputs: the component's, with the step's (bound to the pipeline's) in their place.
    let declared = object(component.get("outputs"), &format!("{at}.outputs"))?
        .cloned()
        .unwrap_or_default();
    let mut outputs = match step.remove("outputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(Error::invalid(format!("{field}.outputs"), "is a mapping")),
    };
    if let Some(extra) = outputs.keys().find(|k| !declared.contains_key(*k)) {
        return Err(Error::invalid(
            format!("{field}.outputs.{extra}"),
            format!("component `{name}` has no output `{extra}`"),
        ));
    }
    for (output, decl) in declared {
        let entry = outputs.entry(output).or_insert(Value::Null);
        if entry.is_null() {
            *entry = decl;
        }
    }
    if !outputs.is_empty() {
        step.insert("outputs".into(), Value::Object(outputs));
    }
    Ok(())
}

/// A component file to register, checked as a step would use it (its command's
/// expressions, its inputs' types and defaults).
#[derive(Debug)]
pub struct ComponentFile {
    pub name: String,
    /// As written; None: the next.
    pub version: Option<String>,
    pub display_name: String,
    pub description: String,
    /// Its code folder, a local path as written.
    pub code: Option<String>,
    /// As written, `code` left out.
    pub definition: Map<String, Value>,
}

/// Reads a component file (the commandComponent schema) for registering.
pub fn check_component(doc: Value) -> Result<ComponentFile> {
    let Value::Object(mut definition) = doc else {
        return Err(Error::invalid(
            "component file",
            "it must be a mapping of keys",
        ));
    };
    let name = text_field(&definition, "name", "name")?
        .ok_or_else(|| Error::invalid("name", "a component to register needs a name"))?
        .to_string();
    let parallel = definition.get("type").and_then(Value::as_str) == Some("parallel");
    if !parallel && !definition.contains_key("command") {
        return Err(Error::invalid(
            "command",
            "a command component needs a command",
        ));
    }
    if parallel && !definition.contains_key("task") {
        return Err(Error::invalid(
            "task",
            "a parallel component needs a task: {type: run_function, code, entry_script, ...}",
        ));
    }
    // A step that gives each required input a value of its type: drafted as a
    // pipeline would draft it, so a bad expression or type is refused now.
    let mut step = Map::new();
    let mut given = Map::new();
    if let Some(inputs) = object(definition.get("inputs"), "inputs")? {
        for (input, decl) in inputs {
            let Value::Object(decl) = decl else {
                continue; // apply_component names it
            };
            if decl.contains_key("default")
                || decl.get("optional").and_then(Value::as_bool) == Some(true)
            {
                continue;
            }
            let min = decl.get("min").cloned();
            let first = decl
                .get("enum")
                .and_then(Value::as_array)
                .and_then(|e| e.first())
                .cloned();
            let kind = decl
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("uri_folder");
            let value = match kind {
                "integer" => min.unwrap_or(Value::from(0)),
                "number" => min.unwrap_or(Value::from(0.0)),
                "boolean" => Value::Bool(true),
                "string" => first.unwrap_or(Value::String("x".into())),
                _ => Value::String("./data".into()),
            };
            given.insert(input.clone(), value);
        }
    }
    step.insert("inputs".into(), Value::Object(given));
    let mut warnings = Vec::new();
    apply_component(&mut step, definition.clone(), "component", &mut warnings).map_err(
        |e| match e {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field: field.trim_start_matches("component.").to_string(),
                reason,
            },
            other => other,
        },
    )?;
    super::draft_step(Value::Object(step))?;
    let code = match component_code_slot(&mut definition).map(std::mem::take) {
        None | Some(Value::Null) => None,
        Some(Value::String(path)) => Some(path),
        Some(Value::Object(map)) => map
            .get("local_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        Some(other) => {
            return Err(Error::invalid(
                "code",
                format!("`{other}` is not a folder path"),
            ));
        }
    };
    if parallel {
        if let Some(Value::Object(task)) = definition.get_mut("task") {
            task.remove("code");
        }
    } else {
        definition.remove("code");
    }
    let version = definition
        .get("version")
        .and_then(scalar_text)
        .filter(|v| !v.is_empty());
    Ok(ComponentFile {
        name,
        version,
        display_name: text_field(&definition, "display_name", "display_name")?
            .unwrap_or_default()
            .to_string(),
        description: text_field(&definition, "description", "description")?
            .unwrap_or_default()
            .to_string(),
        code,
        definition,
    })
}

/// `azureml:NAME:VERSION` or `azureml:NAME@latest` (or `azureml:NAME`): the name
/// and the version (None: the latest).
pub fn component_reference(text: &str) -> Option<(String, Option<String>)> {
    match super::DataRef::parse("component", text).ok()? {
        super::DataRef::Asset { name, version } => Some((name, version)),
        _ => None,
    }
}

/// A literal given for a component input of type `kind` (string, integer, number,
/// boolean), within its `enum`, `min` and `max`.
fn check_literal(value: &Value, kind: &str, decl: &Map<String, Value>, field: &str) -> Result<()> {
    let text = scalar_text(value)
        .ok_or_else(|| Error::invalid(field, format!("`{value}` is not a {kind}")))?;
    let number = match kind {
        "integer" => Some(
            text.trim()
                .parse::<i64>()
                .map_err(|_| Error::invalid(field, format!("`{text}` is not an integer")))?
                as f64,
        ),
        "number" => Some(
            text.trim()
                .parse::<f64>()
                .map_err(|_| Error::invalid(field, format!("`{text}` is not a number")))?,
        ),
        "boolean" => {
            if !matches!(text.as_str(), "true" | "false" | "True" | "False") {
                return Err(Error::invalid(
                    field,
                    format!("`{text}` is not true or false"),
                ));
            }
            None
        }
        "string" => None,
        other => {
            return Err(Error::invalid(
                field,
                format!(
                    "`{other}` is not an input type (string, integer, number, boolean, uri_file, uri_folder, mltable, mlflow_model, custom_model)"
                ),
            ));
        }
    };
    if let Some(Value::Array(allowed)) = decl.get("enum")
        && !allowed
            .iter()
            .any(|a| scalar_text(a).as_deref() == Some(text.as_str()))
    {
        let allowed: Vec<String> = allowed.iter().filter_map(scalar_text).collect();
        return Err(Error::invalid(
            field,
            format!("`{text}` is not one of {}", allowed.join(", ")),
        ));
    }
    if let Some(n) = number {
        if let Some(min) = decl.get("min").and_then(Value::as_f64)
            && n < min
        {
            return Err(Error::invalid(
                field,
                format!("{text} is below the minimum {min}"),
            ));
        }
        if let Some(max) = decl.get("max").and_then(Value::as_f64)
            && n > max
        {
            return Err(Error::invalid(
                field,
                format!("{text} is above the maximum {max}"),
            ));
        }
    }
    Ok(())
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
            refused("type: pipeline\njobs:\n  a: {type: parallel, component: {type: command, command: x}}\n")
                .contains("is not of that type")
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

    const TRAIN: &str = "{type: command, name: train_model, version: 1,
        command: 'python train.py --data ${{inputs.data}} --epochs ${{inputs.epochs}} --lr ${{inputs.lr}} [--schedule ${{inputs.schedule}}] --model ${{outputs.model}}',
        code: /abs/train_src, environment: host,
        inputs: {data: {type: uri_folder}, epochs: {type: integer, min: 1, max: 100},
                 lr: {type: number, default: 0.01}, schedule: {type: string, optional: true, enum: [time, step]}},
        outputs: {model: {type: uri_folder}}}";

    #[test]
    fn a_component_step_takes_the_components_command_typed_inputs_defaults_and_outputs() {
        let text = format!(
            "type: pipeline\ncompute: cpu\ninputs: {{raw: {{type: uri_folder, path: ./data}}, epochs: 20}}\noutputs: {{trained: }}\n\
             jobs:\n  train:\n    component: {TRAIN}\n    inputs: {{data: '${{{{parent.inputs.raw}}}}', epochs: '${{{{parent.inputs.epochs}}}}'}}\n\
             \x20   outputs: {{model: '${{{{parent.outputs.trained}}}}'}}\n"
        );
        let p = read(&text).expect("accepted");
        let train = &p.steps[0].draft;
        assert_eq!(
            train.command.as_deref(),
            Some(
                "python train.py --data ${{inputs.data}} --epochs 20 --lr 0.01  --model ${{outputs.model}}"
            )
        );
        assert_eq!(train.code.as_deref(), Some("/abs/train_src"));
        assert_eq!(
            train.inputs["data"].path,
            super::super::DataRef::Local("./data".into())
        );
        assert!(train.outputs.contains_key("model"));
        assert_eq!(p.outputs["trained"].step, "train");
        let refused = |inputs: &str| {
            read(&format!(
                "type: pipeline\njobs:\n  train:\n    component: {TRAIN}\n    inputs: {inputs}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let unbound = refused("{data: ./d}");
        assert!(unbound.contains("`epochs` is unbound"), "{unbound}");
        assert!(refused("{data: ./d, epochs: many}").contains("`many` is not an integer"));
        assert!(refused("{data: ./d, epochs: 500}").contains("above the maximum 100"));
        assert!(
            refused("{data: ./d, epochs: 5, schedule: daily}").contains("not one of time, step")
        );
        assert!(refused("{data: ./d, epochs: 5, size: 3}").contains("has no input `size`"));
        let file = read("type: pipeline\njobs:\n  a: {component: ./train.yml}\n")
            .unwrap_err()
            .to_string();
        assert!(file.contains("read by `shoal job submit -f`"), "{file}");
        let registered = read("type: pipeline\njobs:\n  a: {component: 'azureml:train@latest'}\n")
            .unwrap_err()
            .to_string();
        assert!(registered.contains("registered components"), "{registered}");
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
