//! A job's data on its node: inputs made before the command runs (from the
//! coordinator, or from a URL through this node's cache), `${{inputs.NAME}}` and
//! `${{outputs.NAME}}` in the command replaced by where they are, and named
//! outputs uploaded when the instance ends.

use std::path::{Path, PathBuf};

use shoal_proto::v1 as pb;
use shoal_proto::v1::launch_input::Source;

use super::Agent;
use crate::archive;
use crate::runtime::Slot;

/// One input, fetched and ready to be laid out.
pub(super) enum Fetched {
    /// A file's bytes, or a folder as tar.gz.
    Bytes(Vec<u8>),
    /// A file in this node's URL cache.
    Cached(PathBuf),
    /// Direct mode: nothing to lay out.
    Nothing,
}

/// Where an input or output is inside the job (`root`: its working dir as the
/// job sees it: the instance's folder, or `/job` in a container).
fn input_path(root: &str, input: &pb::LaunchInput) -> String {
    match &input.source {
        Some(Source::Direct(uri)) => uri.clone(),
        _ if input.folder => format!("{root}/inputs/{}", input.name),
        _ => format!("{root}/inputs/{}/{}", input.name, input.file_name),
    }
}

/// `${{inputs.NAME}}` and `${{outputs.NAME}}` in the argv, replaced.
pub(super) fn substitute(argv: Vec<String>, launch: &pb::Launch, root: &str) -> Vec<String> {
    if launch.inputs.is_empty() && launch.outputs.is_empty() {
        return argv;
    }
    argv.into_iter()
        .map(|mut word| {
            for input in &launch.inputs {
                let placeholder = format!("${{{{inputs.{}}}}}", input.name);
                if word.contains(&placeholder) {
                    word = word.replace(&placeholder, &input_path(root, input));
                }
            }
            for output in &launch.outputs {
                let placeholder = format!("${{{{outputs.{}}}}}", output.name);
                if word.contains(&placeholder) {
                    word = word.replace(
                        &placeholder,
                        &format!("{root}/named-outputs/{}", output.name),
                    );
                }
            }
            word
        })
        .collect()
}

/// The client URL inputs are fetched with: the public roots, and a private CA
/// bundle (a site's proxy, an internal server) from SSL_CERT_FILE, as curl and
/// Python's requests read it.
fn http_client() -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
        let pem = std::fs::read(&path)
            .map_err(|e| format!("SSL_CERT_FILE {}: {e}", Path::new(&path).display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("SSL_CERT_FILE {}: {e}", Path::new(&path).display()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Agent {
    /// Each input of the launch, fetched (URL inputs go through the cache).
    pub(super) async fn fetch_inputs(&self, launch: &pb::Launch) -> Result<Vec<Fetched>, String> {
        let mut fetched = Vec::with_capacity(launch.inputs.len());
        for input in &launch.inputs {
            fetched.push(match &input.source {
                Some(Source::Direct(_)) => Fetched::Nothing,
                Some(Source::Url(url)) => {
                    Fetched::Cached(self.cached(url).await.map_err(|why| {
                        format!("input `{}`: cannot fetch {url}: {why}", input.name)
                    })?)
                }
                Some(Source::Fetch(_)) | None => {
                    let request = pb::InputRef {
                        instance: Some(pb::AttemptRef {
                            attempt_id: launch.attempt_id.clone(),
                            instance: launch.instance,
                            token: launch.token.clone(),
                        }),
                        name: input.name.clone(),
                    };
                    let data = self
                        .until_answered(|mut client| {
                            let request = request.clone();
                            async move { client.fetch_input(request).await }
                        })
                        .await
                        .map_err(|s| format!("input `{}`: {}", input.name, s.message()))?
                        .data;
                    Fetched::Bytes(data)
                }
            });
        }
        Ok(fetched)
    }

    /// A URL's content in this node's cache (fetched once per node).
    async fn cached(&self, url: &str) -> Result<PathBuf, String> {
        let dir = self.config.work_dir.join("cache").join("http");
        let path = dir.join(sha256_hex(url));
        if tokio::fs::metadata(&path).await.is_ok() {
            return Ok(path);
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let response = http_client()?
            .get(url)
            .timeout(std::time::Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the server answered {}", response.status()));
        }
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        let partial = dir.join(format!("{}.part-{}", sha256_hex(url), std::process::id()));
        tokio::fs::write(&partial, &body)
            .await
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// Uploads what the instance wrote to each named output.
    pub(super) async fn upload_named(
        &self,
        slot: &Slot,
        token: &str,
        dir: &Path,
        outputs: &[(String, bool)],
    ) -> Result<(), String> {
        for (name, _) in outputs {
            let path = dir.join("named-outputs").join(name);
            if tokio::fs::metadata(&path).await.is_err() {
                continue; // nothing written
            }
            let packed = tokio::task::spawn_blocking(move || archive::pack_path(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot pack output `{name}`: {e}"))?;
            let upload = pb::OutputsUpload {
                attempt_id: slot.attempt_id.clone(),
                instance: slot.instance,
                data: packed,
                token: token.to_string(),
                output_name: name.clone(),
            };
            self.until_answered(|mut client| {
                let upload = upload.clone();
                async move { client.upload_outputs(upload).await }
            })
            .await
            .map_err(|s| format!("output `{name}`: {}", s.message()))?;
        }
        Ok(())
    }
}

/// Lays the fetched inputs out in `dir/inputs/NAME`, and makes the named
/// outputs' folders in `dir/named-outputs` (blocking).
pub(super) fn lay_out(
    dir: &Path,
    inputs: &[pb::LaunchInput],
    outputs: &[pb::LaunchOutput],
    fetched: Vec<Fetched>,
) -> Result<(), String> {
    for (input, data) in inputs.iter().zip(fetched) {
        let at = dir.join("inputs").join(&input.name);
        std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        let file = at.join(&input.file_name);
        match data {
            Fetched::Nothing => {}
            Fetched::Bytes(bytes) if input.folder => archive::unpack(&bytes, &at)
                .map_err(|e| format!("input `{}`: cannot unpack: {e}", input.name))?,
            Fetched::Bytes(bytes) => {
                std::fs::write(&file, bytes).map_err(|e| format!("{}: {e}", file.display()))?
            }
            Fetched::Cached(path) => {
                std::fs::copy(&path, &file).map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
    }
    // `named-outputs` itself is made with the folder (`WorkDirs::make`).
    let named = dir.join("named-outputs");
    for output in outputs.iter().filter(|o| o.folder) {
        let at = named.join(&output.name);
        std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_paths_inside_the_job() {
        let launch = pb::Launch {
            inputs: vec![
                pb::LaunchInput {
                    name: "iris".into(),
                    folder: false,
                    file_name: "iris.csv".into(),
                    source: Some(Source::Fetch(true)),
                },
                pb::LaunchInput {
                    name: "raw".into(),
                    folder: true,
                    file_name: "raw".into(),
                    source: Some(Source::Url("https://x/raw".into())),
                },
                pb::LaunchInput {
                    name: "uri".into(),
                    folder: true,
                    file_name: String::new(),
                    source: Some(Source::Direct("azureml://datastores/d/paths/p".into())),
                },
            ],
            outputs: vec![pb::LaunchOutput {
                name: "model".into(),
                folder: true,
            }],
            ..Default::default()
        };
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "train ${{inputs.iris}} ${{inputs.raw}} ${{inputs.uri}} > ${{outputs.model}}/m"
                .to_string(),
        ];
        let got = substitute(argv, &launch, "/job");
        assert_eq!(
            got[2],
            "train /job/inputs/iris/iris.csv /job/inputs/raw azureml://datastores/d/paths/p > /job/named-outputs/model/m"
        );
    }
}
