//! The layout of a run directory, shared by the trainer (which writes it)
//! and `trainyard local` (which follows it for progress).

/// One JSON row per logged step and per validation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Where checkpoints live.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The adapter a fine-tuning run writes (Hugging Face PEFT format).
pub const ADAPTER_DIR: &str = "adapter";

/// File name of the checkpoint of `step` (zero-padded, so names sort by step).
pub fn checkpoint_file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// The step of a checkpoint file name, or `None` for any other file.
pub fn checkpoint_step(file_name: &str) -> Option<u64> {
    file_name
        .strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(checkpoint_file_name(300), "step-00000300.safetensors");
        assert_eq!(checkpoint_step(&checkpoint_file_name(12345)), Some(12345));
        assert_eq!(checkpoint_step("step-12.safetensors.tmp"), None);
        assert_eq!(checkpoint_step("config.json"), None);
    }
}
