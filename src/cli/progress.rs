//! indicatif progress for generation stages, drawn only when stdout is a terminal and not
//! `--quiet`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::Observer;

/// Draws one bar per stage (spinner when the total is unknown).
pub struct Bars {
    visible: bool,
    prefix: String,
    bar: Option<ProgressBar>,
    /// (stage, elapsed) of finished stages, for the summary.
    pub finished: Vec<(String, Duration)>,
}

impl Bars {
    pub fn new(visible: bool, prefix: String) -> Self {
        Self {
            visible,
            prefix,
            bar: None,
            finished: Vec::new(),
        }
    }
}

impl Observer for Bars {
    fn stage(&mut self, name: &str, total: u64) {
        if !self.visible {
            return;
        }
        let bar = if total == 0 {
            let b = ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b.set_style(
                ProgressStyle::with_template("{prefix} {spinner} {msg} {elapsed}")
                    .expect("valid template"),
            );
            b
        } else {
            let b = ProgressBar::new(total);
            let unit = if name == "denoise" { "step" } else { "frame" };
            b.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} {{msg:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}s {{per_sec}} ETA {{eta}}"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        };
        bar.set_prefix(self.prefix.clone());
        bar.set_message(name.to_string());
        self.bar = Some(bar);
    }

    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    fn stage_done(&mut self, name: &str, elapsed: Duration) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.finished.push((name.to_string(), elapsed));
    }
}
