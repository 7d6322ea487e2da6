//! The figures: every round's values per pair, kept in [`Results`], reported as medians
//! (with the lowest and highest round) by the benches' Markdown tables; and the cell formats.

use std::collections::BTreeMap;

/// pair → metric → one value per round; and lines for the report (the mTLS checks, the
/// tracing checks), each under a topic.
#[derive(Debug, Default)]
pub struct Results {
    by_pair: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    order: Vec<String>,
    /// (topic, line); the topic "" is [`Results::note`]'s.
    notes: Vec<(String, String)>,
}

impl Results {
    pub fn note(&mut self, line: String) {
        self.note_on("", line);
    }

    /// The lines of [`Results::note`], in order.
    pub fn notes(&self) -> Vec<&str> {
        self.notes_on("")
    }

    pub fn note_on(&mut self, topic: &str, line: String) {
        self.notes.push((topic.to_string(), line));
    }

    /// The lines of one topic, in order.
    pub fn notes_on(&self, topic: &str) -> Vec<&str> {
        self.notes
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, l)| l.as_str())
            .collect()
    }

    pub fn add(&mut self, pair: &str, values: BTreeMap<String, f64>) {
        if !self.order.iter().any(|p| p == pair) {
            self.order.push(pair.to_string());
        }
        let m = self.by_pair.entry(pair.to_string()).or_default();
        for (k, v) in values {
            m.entry(k).or_default().push(v);
        }
    }

    /// The pairs, in the order they were first added.
    pub fn pairs(&self) -> &[String] {
        &self.order
    }

    /// Median over the rounds.
    pub fn get(&self, pair: &str, key: &str) -> Option<f64> {
        median(self.by_pair.get(pair)?.get(key)?.clone())
    }

    /// Highest over the rounds.
    pub fn max(&self, pair: &str, key: &str) -> Option<f64> {
        let v = self.by_pair.get(pair)?.get(key)?;
        v.iter().copied().reduce(f64::max)
    }

    /// Lowest and highest over the rounds, when there was more than one.
    pub fn spread(&self, pair: &str, key: &str) -> Option<(f64, f64)> {
        let v = self.by_pair.get(pair)?.get(key)?;
        if v.len() < 2 {
            return None;
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((lo, hi))
    }

    /// Whether any pair has this measure (its phase ran).
    pub fn measured(&self, key: &str) -> bool {
        self.by_pair.values().any(|m| m.contains_key(key))
    }

    pub fn has(&self, pair: &str) -> bool {
        self.by_pair.contains_key(pair)
    }

    pub fn ratio(&self, a: &str, b: &str, key: &str) -> Option<f64> {
        let (x, y) = (self.get(a, key)?, self.get(b, key)?);
        (y != 0.0).then(|| x / y)
    }

    /// `a`'s value over `b`'s within each round, median over the rounds (None unless both
    /// have a value in every round). Pairs of one round are measured one after the other, so a
    /// machine that is slower for a while (another tenant; hypervisor steal) slows both: the
    /// per-round ratio cancels what the ratio of the medians, taken from different rounds,
    /// does not.
    pub fn paired_ratio(&self, a: &str, b: &str, key: &str) -> Option<f64> {
        median(self.round_ratios(a, b, key)?)
    }

    /// [`Results::paired_ratio`] over the rounds in which `quiet` holds for both pairs'
    /// values of `quiet_key` (the phase's hypervisor steal, say); with the number of those
    /// rounds and of all rounds. None when no round qualifies.
    pub fn paired_ratio_where(
        &self,
        (a, b): (&str, &str),
        key: &str,
        quiet_key: &str,
        quiet: impl Fn(f64) -> bool,
    ) -> Option<(f64, usize, usize)> {
        let ratios = self.round_ratios(a, b, key)?;
        let (qa, qb) = (
            self.by_pair.get(a)?.get(quiet_key)?,
            self.by_pair.get(b)?.get(quiet_key)?,
        );
        let n = ratios.len();
        if qa.len() != n || qb.len() != n {
            return None;
        }
        let kept: Vec<f64> = ratios
            .into_iter()
            .zip(qa.iter().zip(qb))
            .filter(|(_, (qa, qb))| quiet(**qa) && quiet(**qb))
            .map(|(ratio, _)| ratio)
            .collect();
        let m = kept.len();
        Some((median(kept)?, m, n))
    }

    /// `a`'s value over `b`'s in each round; None unless both have a value in every round
    /// and `b`'s is never 0.
    fn round_ratios(&self, a: &str, b: &str, key: &str) -> Option<Vec<f64>> {
        let x = self.by_pair.get(a)?.get(key)?;
        let y = self.by_pair.get(b)?.get(key)?;
        if x.len() != y.len() || y.contains(&0.0) {
            return None;
        }
        Some(x.iter().zip(y).map(|(x, y)| x / y).collect())
    }
}

/// The middle value (the mean of the two middle ones for an even count); None when empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "—".into(),
    }
}

pub fn x(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.2}×"),
        None => "—".into(),
    }
}

/// "12.3 (11.9–12.8)" when there were several rounds.
pub fn with_spread(r: &Results, pair: &str, key: &str, digits: usize) -> String {
    let m = f(r.get(pair, key), digits);
    match r.spread(pair, key) {
        Some((lo, hi)) => format!("{m} ({lo:.digits$}–{hi:.digits$})"),
        None => m,
    }
}

pub fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:.0} %", v * 100.0),
        None => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(r: &mut Results, pair: &str, per_s: f64) {
        r.add(pair, BTreeMap::from([("per_s".to_string(), per_s)]));
    }

    #[test]
    fn a_paired_ratio_follows_the_rounds_and_shrugs_off_one_slow_spell() {
        let mut r = Results::default();
        // b is 10 % slower than a in every round, while the machine's speed drifts; in the
        // last round a slow spell hit b alone.
        for (a, b) in [(100.0, 90.0), (50.0, 45.0), (80.0, 72.0), (100.0, 55.0)] {
            round(&mut r, "a", a);
            round(&mut r, "b", b);
        }
        assert!((r.paired_ratio("b", "a", "per_s").unwrap() - 0.9).abs() < 1e-9);
        // The ratio of the medians mixes rounds: (45, 55, 72, 90) → 63.5 over
        // (50, 80, 100, 100) → 90.
        assert!((r.ratio("b", "a", "per_s").unwrap() - 63.5 / 90.0).abs() < 1e-9);
        // A pair missing a round has no paired ratio.
        round(&mut r, "a", 100.0);
        assert_eq!(r.paired_ratio("b", "a", "per_s"), None);
    }

    #[test]
    fn a_paired_ratio_over_quiet_rounds_leaves_out_a_round_either_pair_had_steal_in() {
        let mut r = Results::default();
        // (a, its steal, b, its steal): the second round's b, and the third round's a, ran
        // while the hypervisor took the CPU.
        for (a, sa, b, sb) in [
            (100.0, 0.0, 90.0, 0.01),
            (100.0, 0.0, 50.0, 0.30),
            (40.0, 0.25, 90.0, 0.0),
            (80.0, 0.01, 72.0, 0.0),
        ] {
            for (pair, per_s, steal) in [("a", a, sa), ("b", b, sb)] {
                r.add(
                    pair,
                    BTreeMap::from([("per_s".to_string(), per_s), ("steal".to_string(), steal)]),
                );
            }
        }
        let quiet = |s: f64| s <= 0.02;
        let (ratio, kept, all) = r
            .paired_ratio_where(("b", "a"), "per_s", "steal", quiet)
            .unwrap();
        assert!((ratio - 0.9).abs() < 1e-9, "{ratio}");
        assert_eq!((kept, all), (2, 4));
        assert_eq!(
            r.paired_ratio_where(("b", "a"), "per_s", "steal", |s| s < 0.0),
            None
        );
    }
}
