//! `mk-upgrade events [--json] [--follow] [--since WHEN]`: the event log
//! (`STATE_DIR/events.jsonl`, see `upgrade_agent::events`).

use std::process::ExitCode;
use std::time::Duration;

use crate::app::{CliError, Global};
use upgrade_agent::events::{EventLine, EventLog, read_from};
use upgrade_agent::exit::Exit;

/// `mk-upgrade events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// One JSON object per line (the log's own lines) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep printing events as they are appended (until interrupted).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events at or after WHEN: a duration back from now (`90s`, `15m`, `2h`, `7d`), a
    /// UTC time (`2026-11-30T16:25:06Z`) or Unix seconds.
    #[arg(long)]
    pub since: Option<String>,
}

/// Parses `--since` into Unix milliseconds, given now.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "invalid --since {s:?}: use a duration (90s, 15m, 2h, 7d), a UTC time \
             (2026-11-30T16:25:06Z) or Unix seconds"
        )
    };
    if let Some((num, unit)) = s
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit())
        .map(|(i, _)| s.split_at(i))
        .filter(|(n, _)| !n.is_empty())
    {
        let mult: u64 = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => 0,
        };
        if mult != 0 {
            let n: u64 = num.parse().map_err(|_| bad())?;
            return Ok(now_ms.saturating_sub(n.saturating_mul(mult)));
        }
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    // YYYY-MM-DDTHH:MM:SS[.fff]Z
    let b = s.as_bytes();
    if b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && s.ends_with('Z') {
        let n = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
        let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) =
            (n(0..4), n(5..7), n(8..10), n(11..13), n(14..16), n(17..19))
        else {
            return Err(bad());
        };
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        // Days from civil (Howard Hinnant).
        let y2 = if mo <= 2 { y - 1 } else { y };
        let era = y2.div_euclid(400);
        let yoe = y2 - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400 + h * 3600 + mi * 60 + se;
        return u64::try_from(secs).map(|v| v * 1000).map_err(|_| bad());
    }
    Err(bad())
}

fn print(e: &EventLine, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let id: String = e.upgrade_id.chars().take(8).collect();
    let subject = match e.kind.as_str() {
        "phase" | "note" => e.phase.clone().unwrap_or_default(),
        "workload" => format!(
            "{} {}",
            e.workload.as_deref().unwrap_or("?"),
            e.status.as_deref().unwrap_or("?")
        ),
        "result" => format!("RESULT {}", e.result.as_deref().unwrap_or("?")),
        _ => String::new(),
    };
    println!("{}  {id}  {:<8} {subject}  {}", e.ts, e.kind, e.what);
}

/// Runs `mk-upgrade events`.
pub fn run(g: &Global, a: &EventsArgs) -> Result<ExitCode, CliError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let since = match &a.since {
        Some(s) => parse_since(s, now_ms).map_err(|e| CliError::new(Exit::Usage, e))?,
        None => 0,
    };
    let log = EventLog::new(&g.state_dir);
    let io = |e: std::io::Error| CliError::new(Exit::Io, format!("{}: {e}", log.path().display()));
    let events = log.read(since).map_err(io)?;
    // Where --follow goes on: the end of what was read, not the file's size later.
    let read_to = std::fs::metadata(log.path()).map_or(0, |m| m.len());
    if events.is_empty() && !a.follow && !a.json {
        println!(
            "no events{}",
            if a.since.is_some() { " since then" } else { "" }
        );
    }
    for e in &events {
        print(e, a.json);
    }
    if a.follow {
        let mut offset = read_to;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut new = Vec::new();
            offset = read_from(log.path(), offset, since, &mut new).map_err(io)?;
            for e in &new {
                print(e, a.json);
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
    }
    Ok(Exit::Ok.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_times_and_seconds() {
        let now = 1_796_055_906_123;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90_000);
        assert_eq!(parse_since("15m", now).unwrap(), now - 900_000);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_since("1d", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_since("1796055906", now).unwrap(), 1_796_055_906_000);
        assert_eq!(
            parse_since("2026-11-30T16:25:06Z", now).unwrap(),
            1_796_055_906_000
        );
        assert_eq!(
            parse_since("2000-02-29T00:00:00.000Z", now).unwrap(),
            951_782_400_000
        );
        for bad in ["", "5x", "yesterday", "2026-13-01T00:00:00Z", "-5m"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
