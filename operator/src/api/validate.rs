//! Checking a manifest the way the apiserver would, and then some.
//!
//! Four layers, each reporting every problem it finds with its field path:
//! 1. the generated CRD schema (types, enums, bounds), as the apiserver checks it;
//! 2. strict typing (unknown fields are errors here, where the apiserver
//!    would only warn and prune them);
//! 3. the CEL rules of the CRD, evaluated locally;
//! 4. semantic rules no schema can express (names, env, volumes, devices).
//!
//! What this release of the trainer can run is the last layer, where the
//! spec becomes facts: [`crate::job::ValidatedJob`].

use std::collections::{BTreeMap, BTreeSet};

use trainyard_trainer::env;

use super::{GROUP, TrainingJob, VERSION, crd};

/// One problem with a manifest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Problem {
    /// Field path, e.g. `spec.distributed.workers`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Longest job name: pod names add `-aggregator-NNNN`, and the job's Service
/// name must stay a 63-character DNS label.
pub const MAX_NAME_LEN: usize = 47;

/// Parses every YAML document in `text` as a TrainingJob and validates it
/// (layers 1 to 4). Returns the jobs, or every problem of every document.
pub fn parse_manifests(text: &str) -> Result<Vec<TrainingJob>, Vec<Problem>> {
    parse_each(text, parse_manifest)
}

/// Reads every YAML document in `text` with `parse`. Returns what each gave,
/// or every problem of every document (prefixed with the document index
/// when there is more than one).
pub fn parse_each<T>(
    text: &str,
    parse: impl Fn(serde_yaml::Value) -> Result<T, Vec<Problem>>,
) -> Result<Vec<T>, Vec<Problem>> {
    let mut parsed = Vec::new();
    let mut problems = Vec::new();
    let docs: Vec<serde_yaml::Value> = match serde_yaml::Deserializer::from_str(text)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<_, _>>()
    {
        Ok(docs) => docs,
        Err(e) => {
            return Err(vec![Problem::new(
                "(document)",
                format!("not valid YAML: {e}"),
            )]);
        }
    };
    let docs: Vec<_> = docs.into_iter().filter(|d| !d.is_null()).collect();
    if docs.is_empty() {
        return Err(vec![Problem::new(
            "(document)",
            "no TrainingJob in the file",
        )]);
    }
    let many = docs.len() > 1;
    for (i, doc) in docs.into_iter().enumerate() {
        match parse(doc) {
            Ok(one) => parsed.push(one),
            Err(ps) => problems.extend(ps.into_iter().map(|p| {
                if many {
                    Problem::new(format!("[document {}] {}", i + 1, p.path), p.message)
                } else {
                    p
                }
            })),
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

/// Validates one parsed document.
pub fn parse_manifest(doc: serde_yaml::Value) -> Result<TrainingJob, Vec<Problem>> {
    let value: serde_json::Value = serde_json::to_value(&doc).map_err(|e| {
        vec![Problem::new(
            "(document)",
            format!("not representable as JSON: {e}"),
        )]
    })?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    let expected = format!("{GROUP}/{VERSION}");
    let mut problems = Vec::new();
    if api_version != Some(expected.as_str()) {
        problems.push(Problem::new(
            "apiVersion",
            format!("must be {expected}, got {}", show(api_version)),
        ));
    }
    if kind != Some("TrainingJob") {
        problems.push(Problem::new(
            "kind",
            format!("must be TrainingJob, got {}", show(kind)),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Every layer that can run does, so one pass shows every problem.
    problems.extend(schema_problems(&value));
    match serde_path_to_error::deserialize::<_, TrainingJob>(&value) {
        Ok(job) => {
            problems.extend(check(&job));
            if problems.is_empty() {
                return Ok(job);
            }
        }
        Err(e) => {
            let path = json_path(&e.path().to_string());
            // The schema layer already explained a type or bound problem here.
            if !problems.iter().any(|p| p.path == path) {
                problems.push(Problem::new(path, e.inner().to_string()));
            }
        }
    }
    problems.sort();
    problems.dedup();
    Err(problems)
}

fn show(v: Option<&str>) -> String {
    v.map_or_else(|| "nothing".into(), |s| format!("`{s}`"))
}

/// serde_path_to_error writes `spec.template.env[0].name`; keep it, but drop
/// a leading dot.
fn json_path(p: &str) -> String {
    p.trim_start_matches('.').to_string()
}

/// Layer 1: the CRD's openAPIV3Schema.
fn schema_problems(value: &serde_json::Value) -> Vec<Problem> {
    let schema = crd::schema();
    let validator = match jsonschema::draft4::new(&schema) {
        Ok(v) => v,
        Err(e) => return vec![Problem::new("(schema)", format!("internal: {e}"))],
    };
    validator
        .iter_errors(value)
        .map(|e| {
            let pointer = e.instance_path().to_string();
            let path = pointer
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.is_empty())
                .fold(String::new(), |mut acc, seg| {
                    if seg.chars().all(|c| c.is_ascii_digit()) {
                        acc.push_str(&format!("[{seg}]"));
                    } else {
                        if !acc.is_empty() {
                            acc.push('.');
                        }
                        acc.push_str(seg);
                    }
                    acc
                });
            Problem::new(
                if path.is_empty() {
                    "(root)".into()
                } else {
                    path
                },
                e.to_string(),
            )
        })
        .collect()
}

/// Layers 3 and 4 on a typed job: CEL rules and semantics. Every problem is
/// reported, not just the first.
pub fn check(job: &TrainingJob) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Err(errors) = job.validate_cel() {
        for e in errors.into_vec() {
            let path = if e.field_path.is_empty() {
                "spec".to_string()
            } else {
                e.field_path.trim_start_matches('.').to_string()
            };
            problems.push(Problem::new(path, e.message));
        }
    }
    check_name(job, &mut problems);
    check_spec(job, &mut problems);
    problems
}

fn check_name(job: &TrainingJob, problems: &mut Vec<Problem>) {
    let Some(name) = job.metadata.name.as_deref() else {
        problems.push(Problem::new("metadata.name", "is required"));
        return;
    };
    let label = name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !label {
        problems.push(Problem::new(
            "metadata.name",
            format!(
                "must be a DNS label of at most {MAX_NAME_LEN} characters (lower-case letters, digits and '-', starting with a letter), got `{name}`: it names the job's Service and pods"
            ),
        ));
    }
}

fn check_spec(job: &TrainingJob, problems: &mut Vec<Problem>) {
    let spec = &job.spec;
    check_device(spec, problems);
    if let Some(f) = &spec.data.folder
        && !f.path.starts_with('/')
    {
        problems.push(Problem::new(
            "spec.data.folder.path",
            format!(
                "must be an absolute path inside the container, got `{}`",
                f.path
            ),
        ));
    }
    if !spec.checkpoints.location.starts_with('/') {
        problems.push(Problem::new(
            "spec.checkpoints.location",
            format!(
                "must be an absolute path inside the container, got `{}`",
                spec.checkpoints.location
            ),
        ));
    }
    if let Some(w) = &spec.training.class_weights
        && w.len() != spec.model.classes as usize
    {
        problems.push(Problem::new(
            "spec.training.classWeights",
            format!(
                "needs one weight per class (model.classes = {}), got {}",
                spec.model.classes,
                w.len()
            ),
        ));
    }
    check_template(spec, problems);
    check_resources(spec, problems);
    check_failure_rules(spec, problems);
}

fn check_template(spec: &super::TrainingJobSpec, problems: &mut Vec<Problem>) {
    let t = &spec.template;
    for (i, var) in t.env.iter().enumerate() {
        if env::RESERVED.contains(&var.name.as_str()) {
            problems.push(Problem::new(
                format!("spec.template.env[{i}].name"),
                format!(
                    "`{}` is set by Trainyard for every replica and cannot be overridden; remove it",
                    var.name
                ),
            ));
        }
    }
    let volumes: BTreeSet<&str> = t.volumes.iter().map(|v| v.name.as_str()).collect();
    for (i, mount) in t.volume_mounts.iter().enumerate() {
        if !volumes.contains(mount.name.as_str()) {
            problems.push(Problem::new(
                format!("spec.template.volumeMounts[{i}].name"),
                format!(
                    "`{}` is not in spec.template.volumes; add the volume or fix the name",
                    mount.name
                ),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, v) in t.volumes.iter().enumerate() {
        if !seen.insert(v.name.as_str()) {
            problems.push(Problem::new(
                format!("spec.template.volumes[{i}].name"),
                format!("`{}` is defined twice", v.name),
            ));
        }
    }
}

/// `training.device` against the GPUs the job requests.
fn check_device(spec: &super::TrainingJobSpec, problems: &mut Vec<Problem>) {
    use super::{ComputeDevice, Mode};
    let gpus_field = match spec.mode {
        Mode::Distributed => "spec.distributed.gpusPerWorker",
        Mode::Peft => "spec.peft.gpusPerWorker",
        Mode::Federated => "",
    };
    let gpus = spec.gpus_per_worker();
    match (spec.training.device, spec.mode) {
        (ComputeDevice::Cuda, Mode::Federated) => problems.push(Problem::new(
            "spec.training.device",
            "Cuda is not available to federated jobs yet: the operator starts clients without GPUs; use Auto or Cpu",
        )),
        (ComputeDevice::Cuda, _) if gpus == 0 => problems.push(Problem::new(
            "spec.training.device",
            format!("Cuda needs GPUs: set {gpus_field} (1 to 8), or use Auto or Cpu"),
        )),
        (ComputeDevice::Cpu, _) if gpus > 0 => problems.push(Problem::new(
            "spec.training.device",
            format!(
                "Cpu with {gpus_field}: {gpus} would leave the requested GPUs idle; use Auto or Cuda, or set {gpus_field}: 0"
            ),
        )),
        _ => {}
    }
}

/// The GPU resource name of the NVIDIA device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

fn check_resources(spec: &super::TrainingJobSpec, problems: &mut Vec<Problem>) {
    let Some(r) = &spec.resources else { return };
    for (section, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        if map.as_ref().is_some_and(|m| m.contains_key(GPU_RESOURCE)) {
            problems.push(Problem::new(
                format!("spec.resources.{section}"),
                format!(
                    "`{GPU_RESOURCE}` comes from spec.distributed.gpusPerWorker; remove it here"
                ),
            ));
        }
    }
}

fn check_failure_rules(spec: &super::TrainingJobSpec, problems: &mut Vec<Problem>) {
    let mut first_rule: BTreeMap<i32, usize> = BTreeMap::new();
    for (i, rule) in spec.run_policy.failure_rules.iter().enumerate() {
        for &code in &rule.exit_codes {
            if let Some(&j) = first_rule.get(&code) {
                problems.push(Problem::new(
                    format!("spec.runPolicy.failureRules[{i}].exitCodes"),
                    format!("exit code {code} is already matched by failureRules[{j}], so this rule never sees it; remove one"),
                ));
            } else {
                first_rule.insert(code, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: trainyard.dev/v1alpha1
kind: TrainingJob
metadata: {name: shapes}
spec:
  mode: Distributed
  image: trainer:dev
  distributed: {workers: 2}
"#;

    fn problems(yaml: &str) -> Vec<String> {
        match parse_manifests(yaml) {
            Ok(_) => Vec::new(),
            Err(ps) => ps.iter().map(ToString::to_string).collect(),
        }
    }

    fn with_spec(extra: &str) -> String {
        format!("{GOOD}{extra}")
    }

    #[test]
    fn a_minimal_manifest_is_valid_and_defaulted() {
        let jobs = parse_manifests(GOOD).unwrap();
        assert_eq!(jobs[0].spec.distributed.as_ref().unwrap().workers, 2);
        assert_eq!(jobs[0].spec.run_policy.backoff_limit, 3);
    }

    #[test]
    fn schema_bounds_name_the_field() {
        let p = problems(&GOOD.replace("workers: 2", "workers: 0"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("spec.distributed.workers: "), "{p:?}");
        assert!(p[0].contains("minimum of 1"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let p = problems(&GOOD.replace("workers: 2", "workers: 0, accumulateSteps: 0"));
        assert_eq!(p.len(), 2, "{p:?}");
        // Schema, CEL and semantic layers together.
        let p = problems(&with_spec(
            "  training: {steps: 5, epochs: 2, batchSize: 0}\n  template: {env: [{name: RANK, value: '1'}]}\n",
        ));
        assert_eq!(p.len(), 3, "{p:?}");
        let p = problems(&with_spec(
            "  data: {shapes: {}, folder: {path: /d}}\n  training: {steps: 5, epochs: 2}\n",
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("exactly one of data.shapes and data.folder")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.contains("at most one of training.steps")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_fields_and_enums_are_errors() {
        let p = problems(&with_spec("  trainig: {steps: 5}\n"));
        assert!(p.iter().any(|m| m.contains("trainig")), "{p:?}");
        let p = problems(&GOOD.replace("mode: Distributed", "mode: distributed"));
        assert!(p.iter().any(|m| m.starts_with("spec.mode: ")), "{p:?}");
    }

    #[test]
    fn mode_and_section_must_match() {
        let p = problems(&GOOD.replace(
            "distributed: {workers: 2}",
            "peft: {baseCheckpoint: /b.safetensors}",
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("mode Distributed needs the `distributed` section")),
            "{p:?}"
        );
        let p = problems(&with_spec("  federated: {clients: 2, minClients: 3}\n"));
        assert!(p.iter().any(|m| m.contains("no `federated`")), "{p:?}");
        assert!(
            p.iter()
                .any(|m| m.contains("minClients must not exceed clients")),
            "{p:?}"
        );
    }

    #[test]
    fn reserved_env_and_dangling_mounts_are_refused() {
        let p = problems(&with_spec(
            "  template:\n    env: [{name: RANK, value: '3'}, {name: OK, value: x}]\n    volumeMounts: [{name: data, mountPath: /data}]\n",
        ));
        assert!(p.contains(&"spec.template.env[0].name: `RANK` is set by Trainyard for every replica and cannot be overridden; remove it".to_string()), "{p:?}");
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.template.volumeMounts[0].name: `data` is not in")),
            "{p:?}"
        );
    }

    #[test]
    fn names_must_fit_dns() {
        let p = problems(&GOOD.replace("name: shapes", "name: Shapes_1"));
        assert!(p.iter().any(|m| m.starts_with("metadata.name: ")), "{p:?}");
        let p = problems(&GOOD.replace("apiVersion: trainyard.dev/v1alpha1", "apiVersion: v1"));
        assert_eq!(p, ["apiVersion: must be trainyard.dev/v1alpha1, got `v1`"]);
    }

    #[test]
    fn what_only_the_trainer_knows_is_left_to_the_job_layer() {
        assert!(problems(&with_spec("  data: {shapes: {imageSize: 36}}\n")).is_empty());
    }

    #[test]
    fn gpu_jobs_validate_and_nonsense_is_refused() {
        for spec in [
            "{workers: 2, gpusPerWorker: 1}",
            "{workers: 2, gpusPerWorker: 8, backend: Nccl}",
            "{workers: 1, gpusPerWorker: 2, backend: Tcp}",
        ] {
            let p = problems(&GOOD.replace("{workers: 2}", spec));
            assert!(p.is_empty(), "{spec}: {p:?}");
        }
        let p = problems(&GOOD.replace("{workers: 2}", "{workers: 2, gpusPerWorker: 9}"));
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.distributed.gpusPerWorker: ")),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("{workers: 2}", "{workers: 2, backend: Nccl}"));
        assert!(
            p.iter()
                .any(|m| m.contains("backend Nccl needs gpusPerWorker >= 1")),
            "{p:?}"
        );
        let p = problems(&with_spec("  training: {device: Cuda}\n"));
        assert!(
            p.iter().any(|m| m.starts_with(
                "spec.training.device: Cuda needs GPUs: set spec.distributed.gpusPerWorker"
            )),
            "{p:?}"
        );
        let p = problems(
            &with_spec("  training: {device: Cpu}\n")
                .replace("{workers: 2}", "{workers: 2, gpusPerWorker: 2}"),
        );
        assert!(
            p.iter()
                .any(|m| m.contains("leave the requested GPUs idle")),
            "{p:?}"
        );
        let p = problems(&with_spec("  resources: {limits: {nvidia.com/gpu: '1'}}\n"));
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.resources.limits: `nvidia.com/gpu` comes from")),
            "{p:?}"
        );
    }

    #[test]
    fn server_optimizer_settings_belong_to_their_rule() {
        let fl = |opt: &str| {
            format!(
                "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: fl}}\nspec:\n  mode: Federated\n  image: t:1\n  federated: {{clients: 3, minClients: 2, serverOptimizer: {opt}}}\n"
            )
        };
        assert!(problems(&fl("{type: Adam, biasCorrection: None}")).is_empty());
        let p = problems(&fl("{type: Sgd, biasCorrection: Flower}"));
        assert!(
            p.iter()
                .any(|m| m.contains("apply to serverOptimizer type Adam or Yogi only")),
            "{p:?}"
        );
        let p = problems(&fl("{type: Yogi, momentum: 0.9}"));
        assert!(
            p.iter()
                .any(|m| m.contains("momentum applies to serverOptimizer type Sgd only")),
            "{p:?}"
        );
    }

    #[test]
    fn duplicate_exit_codes_are_refused() {
        let p = problems(&with_spec(
            "  runPolicy:\n    failureRules:\n    - {exitCodes: [3, 4], action: FailJob}\n    - {exitCodes: [4], action: RestartGang}\n",
        ));
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.runPolicy.failureRules[1].exitCodes: exit code 4")),
            "{p:?}"
        );
    }
}
