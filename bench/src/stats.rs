//! Medians over rounds. Every figure of the bench is the median of several
//! rounds with its min–max spread, and contenders are measured round by
//! round in turn, so a burst of noise on this shared machine hits them all
//! alike instead of one of them.

/// Median and spread of a figure over rounds.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// The median round.
    pub median: f64,
    /// The lowest round.
    pub min: f64,
    /// The highest round.
    pub max: f64,
}

impl Sample {
    /// The sample of `values` (at least one).
    pub fn of(mut values: Vec<f64>) -> Sample {
        assert!(!values.is_empty(), "a sample needs at least one round");
        values.sort_by(f64::total_cmp);
        Sample {
            median: values[values.len() / 2],
            min: values[0],
            max: values[values.len() - 1],
        }
    }

    /// The sample of `f(value)` for a decreasing `f` (e.g. a rate from a
    /// time per item): min and max swap.
    pub fn map_decreasing(&self, f: impl Fn(f64) -> f64) -> Sample {
        Sample {
            median: f(self.median),
            min: f(self.max),
            max: f(self.min),
        }
    }

    /// `median unit (min–max)`, with `decimals` decimals; the spread is
    /// left out for a single round.
    pub fn show(&self, unit: &str, decimals: usize) -> String {
        if self.min == self.max {
            format!("{:.*} {unit}", decimals, self.median)
        } else {
            format!(
                "{:.*} {unit} ({:.*}–{:.*})",
                decimals, self.median, decimals, self.min, decimals, self.max
            )
        }
    }
}

/// A contender: one round of its measurement, as a closure.
pub type Round<'a, E> = Box<dyn FnMut() -> Result<f64, E> + 'a>;

/// Runs `rounds` rounds; in each, every contender once, in order. Returns
/// one sample per contender, or the first error each contender hit.
pub fn median_of_rounds<E>(
    rounds: usize,
    mut contenders: Vec<Round<'_, E>>,
) -> Vec<Result<Sample, E>> {
    let mut values: Vec<Result<Vec<f64>, E>> = contenders.iter().map(|_| Ok(Vec::new())).collect();
    for _ in 0..rounds {
        for (run, got) in contenders.iter_mut().zip(values.iter_mut()) {
            if let Ok(list) = got {
                match run() {
                    Ok(v) => list.push(v),
                    Err(e) => *got = Err(e),
                }
            }
        }
    }
    values.into_iter().map(|v| v.map(Sample::of)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_interleaved() {
        let mut a = [3.0, 1.0, 2.0].into_iter();
        let mut b = [10.0].into_iter();
        let got = median_of_rounds::<String>(
            3,
            vec![
                Box::new(|| Ok(a.next().unwrap())),
                Box::new(|| b.next().ok_or_else(|| "out".to_string())),
            ],
        );
        let s = got[0].as_ref().unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(got[1].as_ref().unwrap_err(), "out");
        assert_eq!(s.show("ns", 1), "2.0 ns (1.0–3.0)");
    }
}
