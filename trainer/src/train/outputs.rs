//! Where what a run does is told: the run's `metrics.jsonl`, the progress
//! report to the operator, Prometheus and the terminal (a progress bar or log
//! lines). The loop says once what happened; [`Outputs`] decides who hears
//! of it. Only rank 0 writes files, reports and prints; every rank with
//! metrics keeps its own Prometheus series current.

use std::path::Path;
use std::time::Duration;

use crate::config::TrainerConfig;
use crate::ddp::CommStats;
use crate::metrics::TrainerMetrics;
use crate::protocol::{CheckpointMessage, ProgressMessage};
use crate::report::Reporter;
use crate::run_dir::{EvalReport, LearnedWeights, MetricsLog, Row, RunDir, TrainRow, ValRow};

use super::{RunOptions, TrainError};

/// A completed optimiser step, as the outputs see it.
pub(super) struct StepDone {
    /// Steps completed.
    pub done: u64,
    /// The group's loss.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples per second over the group.
    pub samples_per_sec: f64,
    /// This rank's samples of the step.
    pub samples: u64,
    /// This rank's samples that had input noise added.
    pub noisy: usize,
    /// This rank's communication so far.
    pub comm: CommStats,
}

/// The sinks of one process's run.
pub(super) struct Outputs<'a> {
    /// Rank 0's row log.
    log: Option<MetricsLog>,
    reporter: Option<&'a Reporter>,
    /// What rank 0 last told the operator; each report carries all of it.
    progress: ProgressMessage,
    metrics: Option<&'a TrainerMetrics>,
    /// What the metrics have been told of the communication so far.
    comm_reported: CommStats,
    bar: Option<indicatif::ProgressBar>,
    /// Rank 0 prints log lines (when there is no bar).
    prints: bool,
    log_every: u64,
    steps: u64,
}

impl<'a> Outputs<'a> {
    /// Rank 0 (`run` is its directory) writes the effective config and opens
    /// the row log, dropping rows past `resumed_from`; other ranks only keep
    /// their metrics.
    pub(super) fn open(
        run: Option<&RunDir>,
        config: &TrainerConfig,
        opts: &'a RunOptions,
        start_step: u64,
        resumed_from: Option<u64>,
    ) -> Result<Self, TrainError> {
        let steps = config.train.steps;
        let log = match run {
            Some(run) => {
                run.write_config(config)?;
                Some(run.log(resumed_from)?)
            }
            None => None,
        };
        let root = run.is_some();
        let bar = (root && opts.progress_bar && start_step < steps).then(|| {
            let bar = indicatif::ProgressBar::new(steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            bar.set_position(start_step);
            bar
        });
        Ok(Self {
            log,
            reporter: opts.report.as_ref().filter(|_| root),
            progress: ProgressMessage::default(),
            metrics: opts.metrics.as_ref(),
            comm_reported: CommStats::default(),
            prints: root && bar.is_none(),
            bar,
            log_every: config.train.log_every,
            steps,
        })
    }

    /// The loss logged last before a resume: what a resumed run that was
    /// already complete reports.
    pub(super) fn logged_loss(&self) -> Option<f64> {
        self.log.as_ref().and_then(MetricsLog::last_loss)
    }

    pub(super) fn step(&mut self, s: &StepDone) -> Result<(), TrainError> {
        if let Some(log) = self.log.as_mut() {
            log.write(&Row::Train(TrainRow {
                step: s.done,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
                samples_per_sec: s.samples_per_sec,
                noisy_samples: s.noisy,
            }))?;
        }
        if let Some(r) = self.reporter {
            self.progress.step = s.done;
            self.progress.loss = Some(s.loss);
            self.progress.samples_per_second = Some(s.samples_per_sec);
            r.send(self.progress.clone());
        }
        if let Some(m) = self.metrics {
            m.step.set(s.done as i64);
            m.steps_total.inc();
            m.loss.set(s.loss);
            m.learning_rate.set(s.lr);
            m.samples_per_second.set(s.samples_per_sec);
            m.samples_total.inc_by(s.samples);
            m.allreduce_seconds_total
                .inc_by((s.comm.time - self.comm_reported.time).as_secs_f64());
            m.allreduce_bytes_total
                .inc_by(s.comm.bytes - self.comm_reported.bytes);
            self.comm_reported = s.comm;
        }
        if let Some(bar) = &self.bar {
            bar.set_position(s.done);
            bar.set_message(format!(
                "loss {:.4}  {:.1} img/s",
                s.loss, s.samples_per_sec
            ));
        } else if self.prints && (s.done.is_multiple_of(self.log_every) || s.done == self.steps) {
            tracing::info!(
                step = s.done,
                loss = s.loss,
                lr = s.lr,
                samples_per_sec = s.samples_per_sec,
                "train"
            );
        }
        Ok(())
    }

    /// A fine-tuning run's base, scored before training: logged as step 0,
    /// not reported as the run's quality.
    pub(super) fn base(&mut self, report: &EvalReport) -> Result<(), TrainError> {
        self.val_row(0, report, None)?;
        if self.log.is_some() {
            tracing::info!(
                miou = report.scores.miou,
                "the base on this data, before fine-tuning"
            );
        }
        Ok(())
    }

    /// A validation pass after step `done` (rank 0's, which holds the whole
    /// split's counts).
    pub(super) fn validation(
        &mut self,
        done: u64,
        report: &EvalReport,
        task_weights: Option<LearnedWeights>,
    ) -> Result<(), TrainError> {
        if self.log.is_none() {
            return Ok(());
        }
        self.val_row(done, report, task_weights)?;
        let scores = &report.scores;
        if let Some(r) = self.reporter {
            self.progress.metric = Some(scores.miou);
            r.send(self.progress.clone());
        }
        if let Some(m) = self.metrics {
            m.val_miou.set(scores.miou);
            m.val_pixel_accuracy.set(scores.pixel_accuracy);
        }
        match &self.bar {
            Some(bar) => bar.println(format!(
                "step {done}: val miou {:.3} pixel accuracy {:.3}",
                scores.miou, scores.pixel_accuracy
            )),
            None => tracing::info!(
                step = done,
                miou = scores.miou,
                pixel_accuracy = scores.pixel_accuracy,
                "validation"
            ),
        }
        Ok(())
    }

    fn val_row(
        &mut self,
        step: u64,
        report: &EvalReport,
        task_weights: Option<LearnedWeights>,
    ) -> Result<(), TrainError> {
        if let Some(log) = self.log.as_mut() {
            log.write(&Row::Val(ValRow {
                step,
                report: report.clone(),
                task_weights,
            }))?;
        }
        Ok(())
    }

    /// Makes the rows so far durable: called before a checkpoint is written,
    /// so that the log covers at least what the checkpoint does.
    pub(super) fn flush(&mut self) -> Result<(), TrainError> {
        if let Some(log) = self.log.as_mut() {
            log.flush()?;
        }
        Ok(())
    }

    /// The checkpoint of step `done` is at `path`; writing it took `took`.
    pub(super) fn checkpoint(&mut self, done: u64, path: &Path, took: Duration) {
        if let Some(r) = self.reporter {
            self.progress.checkpoint = Some(CheckpointMessage {
                step: done,
                path: path.display().to_string(),
            });
            r.send(self.progress.clone());
        }
        if let Some(m) = self.metrics {
            m.checkpoints_total.inc();
            m.checkpoint_seconds.observe(took.as_secs_f64());
        }
        tracing::debug!(path = %path.display(), "checkpoint written");
    }

    /// A fine-tuning run's adapter is in `dir`.
    pub(super) fn adapter(&mut self, dir: &Path, bytes: u64) {
        tracing::info!(dir = %dir.display(), bytes, "adapter written");
        if let Some(r) = self.reporter {
            self.progress.adapter = Some(dir.display().to_string());
            r.send(self.progress.clone());
        }
    }

    /// The run stops before its last step (a checkpoint was written).
    pub(super) fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    /// The loop is over: the rows are flushed and the bar completed.
    pub(super) fn finish(&mut self) -> Result<(), TrainError> {
        self.flush()?;
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        Ok(())
    }
}
