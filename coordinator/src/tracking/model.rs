//! MLflow's entities as its REST API writes them (snake_case JSON, numbers for
//! int64; a metric value that is not finite as "NaN", "Infinity" or "-Infinity").

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub key: String,
    #[serde(serialize_with = "write_f64", deserialize_with = "read_f64")]
    pub value: f64,
    #[serde(default, deserialize_with = "read_i64")]
    pub timestamp: i64,
    #[serde(default, deserialize_with = "read_i64")]
    pub step: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    pub artifact_location: String,
    pub lifecycle_stage: String,
    pub creation_time: i64,
    pub last_update_time: i64,
    pub tags: Vec<Tag>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    pub run_uuid: String,
    pub run_name: String,
    pub experiment_id: String,
    pub user_id: String,
    pub status: String,
    pub start_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    pub artifact_uri: String,
    pub lifecycle_stage: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RunData {
    /// The latest value of each metric.
    pub metrics: Vec<Metric>,
    pub params: Vec<Tag>,
    pub tags: Vec<Tag>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub info: RunInfo,
    pub data: RunData,
    /// Dataset and model inputs: not kept here.
    pub inputs: serde_json::Value,
    /// The models the run logged (`model_outputs`).
    pub outputs: serde_json::Value,
}

/// The run statuses MLflow knows.
pub const RUN_STATUSES: [&str; 5] = ["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"];

/// A job's run: the run id of each attempt (`job-7.2` is `job-7-2`, since a run id
/// is letters, digits, `_` and `-`).
pub fn run_id_of_attempt(attempt_id: &str) -> String {
    attempt_id.replace('.', "-")
}

/// The MLflow status a run takes when its attempt ended so (`Attempt::status`).
pub fn run_status_of_attempt(attempt_status: &str) -> &'static str {
    match attempt_status {
        "completed" => "FINISHED",
        "failed" | "timed_out" => "FAILED",
        _ => "KILLED",
    }
}

/// Where a run's artifacts are, as the client resolves them against the tracking
/// URI (`/api/2.0/mlflow-artifacts/artifacts/<experiment>/<run>/artifacts/...`).
pub fn run_artifact_uri(experiment_id: i64, run_id: &str) -> String {
    format!("mlflow-artifacts:/{experiment_id}/{run_id}/artifacts")
}

pub fn experiment_artifact_location(experiment_id: i64) -> String {
    format!("mlflow-artifacts:/{experiment_id}")
}

fn write_f64<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        s.serialize_f64(*value)
    } else if value.is_nan() {
        s.serialize_str("NaN")
    } else if *value > 0.0 {
        s.serialize_str("Infinity")
    } else {
        s.serialize_str("-Infinity")
    }
}

/// A number, or the words protobuf's JSON uses for what JSON numbers cannot say.
pub fn read_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Number(f64),
        Text(String),
    }
    match Wire::deserialize(d)? {
        Wire::Number(n) => Ok(n),
        Wire::Text(t) => match t.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => other
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{other}` is not a number"))),
        },
    }
}

/// An int64 as a number or as a string of digits (protobuf's JSON writes both).
pub fn read_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    read_opt_i64(d).map(Option::unwrap_or_default)
}

pub fn read_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Number(i64),
        Float(f64),
        Text(String),
    }
    match Option::<Wire>::deserialize(d)? {
        None => Ok(None),
        Some(Wire::Number(n)) => Ok(Some(n)),
        Some(Wire::Float(f)) => Ok(Some(f as i64)),
        Some(Wire::Text(t)) if t.is_empty() => Ok(None),
        Some(Wire::Text(t)) => t
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{t}` is not an integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_that_json_cannot_hold_travel_as_words() {
        let m = Metric {
            key: "loss".into(),
            value: f64::NAN,
            timestamp: 1,
            step: 2,
        };
        let text = serde_json::to_string(&m).expect("json");
        assert!(text.contains("\"NaN\""), "{text}");
        let back: Metric =
            serde_json::from_str(r#"{"key":"a","value":"-Infinity","timestamp":"17","step":3}"#)
                .expect("parse");
        assert_eq!(back.value, f64::NEG_INFINITY);
        assert_eq!(back.timestamp, 17);
        assert!(serde_json::from_str::<Metric>(r#"{"key":"a","value":"x"}"#).is_err());
    }

    #[test]
    fn run_ids_are_what_the_client_accepts() {
        let id = run_id_of_attempt("job-12.3");
        assert_eq!(id, "job-12-3");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
