//! `evm top --api-sock PATH`: a live terminal view of a running VM, drawn
//! with ratatui from the control API's `/status` and `/epochs`: the
//! current epoch, freeze time, dirty rate and log bandwidth as sparklines
//! over the recent epochs, log fill and how close the next migration is.
//! Redrawn every refresh and on every resize; `q` (or Esc, Ctrl-C) quits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Sparkline};
use serde_json::Value;

use crate::api::client::{self, ClientError};

/// Errors of `evm top`.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The first request failed (later failures are shown, not fatal).
    #[error(transparent)]
    Api(#[from] ClientError),
    /// The terminal.
    #[error("evm top: terminal")]
    Terminal(#[source] std::io::Error),
    /// Standard output is not a terminal.
    #[error("evm top needs a terminal (use `evm status --api-sock {}` in scripts)", .0.display())]
    NotATerminal(PathBuf),
}

/// One epoch as the view needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Point {
    /// Epoch number.
    pub epoch: u64,
    /// Freeze time (µs).
    pub freeze_us: u64,
    /// Guest bytes dirtied per second since the previous epoch.
    pub dirty_bps: u64,
    /// Log bytes written per second since the previous epoch.
    pub log_bps: u64,
}

/// What is on the screen.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The socket.
    pub sock: String,
    /// The last `/status`.
    pub status: Value,
    /// Per-epoch series from `/epochs`, oldest first.
    pub points: Vec<Point>,
    /// The last request's error, if it failed.
    pub error: Option<String>,
}

/// Turn `/epochs` into per-epoch points.
pub fn points(epochs: &Value) -> Vec<Point> {
    let list = epochs["epochs"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    let mut prev_ns: Option<u64> = None;
    for e in &list {
        let ns = e["wall_time_ns"].as_u64().unwrap_or(0);
        let secs = prev_ns
            .filter(|p| ns > *p)
            .map(|p| (ns - p) as f64 / 1e9)
            .unwrap_or(0.0);
        let per_s = |bytes: u64| {
            if secs > 0.0 {
                (bytes as f64 / secs) as u64
            } else {
                0
            }
        };
        out.push(Point {
            epoch: e["epoch"].as_u64().unwrap_or(0),
            freeze_us: e["freeze_us"].as_u64().unwrap_or(0),
            dirty_bps: per_s(e["dirty_pages"].as_u64().unwrap_or(0) * 4096),
            log_bps: per_s(e["bytes"].as_u64().unwrap_or(0)),
        });
        prev_ns = Some(ns);
    }
    out
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for k in path {
        match cur.get(k) {
            Some(x) => cur = x,
            None => return 0.0,
        }
    }
    cur.as_f64().unwrap_or(0.0)
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn mib(b: f64) -> f64 {
    b / f64::from(1u32 << 20)
}

/// The last `width` values of a series (a sparkline draws from the left).
fn tail(series: &[u64], width: u16) -> &[u64] {
    &series[series.len().saturating_sub(width as usize)..]
}

fn spark(f: &mut Frame, area: Rect, title: String, series: &[u64], color: Color) {
    let inner = area.width.saturating_sub(2);
    f.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .data(tail(series, inner))
            .style(Style::default().fg(color)),
        area,
    );
}

/// Draw `view` into the frame (any size, down to nothing).
pub fn draw(f: &mut Frame, view: &View) {
    let s = &view.status;
    let has_store = !s["store"].is_null();
    let [head, freeze, dirty, log, gauges, foot] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Min(3),
        Constraint::Min(3),
        Constraint::Min(3),
        Constraint::Length(if has_store { 6 } else { 0 }),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let state = text(s, "state");
    let lines = vec![
        Line::from(format!(
            "{state}   {} vCPUs   {:.0} MiB   up {:.0} s   {}",
            text(s, "vcpus"),
            mib(num(s, &["mem_bytes"])),
            num(s, &["uptime_s"]),
            view.sock
        )),
        Line::from(if has_store {
            format!(
                "epoch {} accumulating, {} committed last; {} this run, every {} ms",
                text(s, "current_epoch"),
                text(s, "last_committed_epoch"),
                text(s, "epochs_committed"),
                text(s, "interval_ms"),
            )
        } else {
            "no store (--no-store): no epochs".to_string()
        }),
        Line::from(format!(
            "failures {}{}   store {}",
            text(s, "checkpoint_failures"),
            if s["checkpoints_failing"] == true {
                format!(" (FAILING: {})", text(s, "last_error"))
            } else {
                String::new()
            },
            text(s, "store"),
        )),
    ];
    let head_style = match (&view.error, s["checkpoints_failing"] == true) {
        (Some(_), _) | (_, true) => Style::default().fg(Color::Red),
        _ => Style::default(),
    };
    f.render_widget(
        Paragraph::new(lines)
            .style(head_style)
            .block(Block::default().borders(Borders::ALL).title(" evm top ")),
        head,
    );

    let last = view.points.last().copied().unwrap_or_default();
    let max_freeze = view.points.iter().map(|p| p.freeze_us).max().unwrap_or(0);
    let freeze_series: Vec<u64> = view.points.iter().map(|p| p.freeze_us).collect();
    spark(
        f,
        freeze,
        format!(" freeze µs  last {}  max {} ", last.freeze_us, max_freeze),
        &freeze_series,
        Color::Yellow,
    );
    let dirty_series: Vec<u64> = view.points.iter().map(|p| p.dirty_bps).collect();
    spark(
        f,
        dirty,
        format!(" dirty rate  {:.1} MiB/s ", mib(last.dirty_bps as f64)),
        &dirty_series,
        Color::Cyan,
    );
    let log_series: Vec<u64> = view.points.iter().map(|p| p.log_bps).collect();
    spark(
        f,
        log,
        format!(" log bandwidth  {:.1} MiB/s ", mib(last.log_bps as f64)),
        &log_series,
        Color::Green,
    );

    if has_store {
        let [fill, migrate] =
            Layout::vertical([Constraint::Length(3), Constraint::Length(3)]).areas(gauges);
        let log_fill = num(s, &["log", "log_fill"]).clamp(0.0, 1.0);
        let threshold = num(s, &["log", "migrate_threshold"]).clamp(0.0, 1.0);
        f.render_widget(
            Gauge::default()
                .block(Block::default().borders(Borders::ALL).title(format!(
                    " log fill of {:.0} MiB ",
                    mib(num(s, &["log", "log_bytes"]))
                )))
                .gauge_style(Style::default().fg(Color::Magenta))
                .ratio(log_fill)
                .label(format!("{:.1}%", 100.0 * log_fill)),
            fill,
        );
        let toward = if threshold > 0.0 {
            (log_fill / threshold).clamp(0.0, 1.0)
        } else {
            0.0
        };
        f.render_widget(
            Gauge::default()
                .block(Block::default().borders(Borders::ALL).title(format!(
                    " next migration at {:.0}% fill   home epoch {}   {} migrations ",
                    100.0 * threshold,
                    text(&s["log"], "home_epoch"),
                    text(s, "migrations"),
                )))
                .gauge_style(Style::default().fg(Color::Blue))
                .ratio(toward)
                .label(format!("{:.0}% of the way", 100.0 * toward)),
            migrate,
        );
    }
    let footer = match &view.error {
        Some(e) => format!("q quits   last update failed: {e}"),
        None => "q quits".to_string(),
    };
    f.render_widget(Paragraph::new(footer), foot);
}

fn refresh(sock: &Path, view: &mut View) -> Result<(), ClientError> {
    let status = client::json(sock, "GET", "/status", None, client::QUICK)?;
    let epochs = client::json(sock, "GET", "/epochs", None, client::QUICK)?;
    view.status = status;
    view.points = points(&epochs);
    view.error = None;
    Ok(())
}

/// Run the view until `q`.
pub fn run(sock: &Path, every: Duration) -> Result<(), TopError> {
    use std::io::IsTerminal;
    let mut view = View {
        sock: sock.display().to_string(),
        ..View::default()
    };
    // A socket nobody serves is an error before the screen is taken.
    refresh(sock, &mut view)?;
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal(sock.to_path_buf()));
    }
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let result = (|| -> std::io::Result<()> {
        let mut next = Instant::now() + every;
        loop {
            terminal.draw(|f| draw(f, &view))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(k) if k.kind != KeyEventKind::Release => {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                    // The next draw takes the new size.
                    Event::Resize(_, _) => terminal.autoresize()?,
                    _ => {}
                }
                continue;
            }
            if let Err(e) = refresh(sock, &mut view) {
                view.error = Some(e.to_string());
            }
            next = Instant::now() + every;
        }
    })();
    ratatui::try_restore().map_err(TopError::Terminal)?;
    result.map_err(TopError::Terminal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn sample() -> View {
        let epochs = serde_json::json!({"epochs": (1..300).map(|i| serde_json::json!({
            "epoch": i, "wall_time_ns": i * 1_000_000_000u64, "freeze_us": 100 + i % 7,
            "dirty_pages": 256 * (i % 5), "bytes": 1u64 << 20, "disk_blocks": 0, "commit_latency_us": 9
        })).collect::<Vec<_>>()});
        View {
            sock: "/tmp/a.sock".into(),
            status: serde_json::json!({
                "state": "running", "vcpus": 2, "mem_bytes": 1u64 << 30, "uptime_s": 12.0,
                "store": "/s", "interval_ms": 1000, "last_committed_epoch": 299, "current_epoch": 300,
                "epochs_committed": 299, "checkpoint_failures": 0, "checkpoints_failing": false,
                "migrations": 2, "log": {"log_bytes": 1u64 << 31, "log_fill": 0.3, "migrate_threshold": 0.5, "home_epoch": 120}
            }),
            points: points(&epochs),
            error: None,
        }
    }

    fn screen(w: u16, h: u16, view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn series_are_rates_per_epoch() {
        let p = points(&serde_json::json!({"epochs": [
            {"epoch": 1, "wall_time_ns": 0, "freeze_us": 5, "dirty_pages": 0, "bytes": 0},
            {"epoch": 2, "wall_time_ns": 2_000_000_000u64, "freeze_us": 7, "dirty_pages": 512, "bytes": 4096},
        ]}));
        assert_eq!(
            p[1],
            Point {
                epoch: 2,
                freeze_us: 7,
                dirty_bps: 1 << 20,
                log_bps: 2048
            }
        );
        assert!(points(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn draws_at_every_size_and_redraws_after_a_resize() {
        let view = sample();
        let big = screen(120, 40, &view);
        assert!(big.contains("epoch 300 accumulating"), "{big}");
        assert!(big.contains("freeze µs  last 105  max 106"), "{big}");
        assert!(big.contains("30.0%"), "{big}");
        assert!(big.contains("60% of the way"), "{big}");
        // Smaller and tiny terminals: no panic, the title still there.
        let small = screen(40, 12, &view);
        assert!(small.contains("evm top"), "{small}");
        for (w, h) in [(1, 1), (0, 0), (5, 3), (300, 100)] {
            screen(w, h, &view);
        }
        // One terminal resized between draws draws the new size fully.
        let mut t = Terminal::new(TestBackend::new(100, 30)).unwrap();
        t.draw(|f| draw(f, &view)).unwrap();
        t.backend_mut().resize(60, 20);
        t.autoresize().unwrap();
        let frame = t.draw(|f| draw(f, &view)).unwrap();
        assert_eq!((frame.area.width, frame.area.height), (60, 20));
        let no_store = View {
            status: serde_json::json!({"state": "paused", "store": null}),
            ..View::default()
        };
        assert!(screen(80, 24, &no_store).contains("no store"));
    }
}
