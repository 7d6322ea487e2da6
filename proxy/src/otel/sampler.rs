//! Which traces are recorded: the OpenTelemetry SDK samplers, configured by
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (or control's mesh-wide ratio).

use opentelemetry::trace::TraceId;

/// One of the specification's built-in samplers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Records a trace when its id falls in the ratio (every sidecar decides alike for one
    /// trace id).
    Ratio(f64),
    /// The caller's decision when there is one; else the root sampler.
    ParentBased(Root),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Default for Sampler {
    /// The specification's default: `parentbased_always_on`.
    fn default() -> Self {
        Sampler::ParentBased(Root::AlwaysOn)
    }
}

impl Sampler {
    /// From the two environment variables' values; the error says what is wrong.
    pub fn from_env_values(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG={a:?}: want a ratio from 0 to 1")
                    }),
            }
        };
        Ok(match name.map(str::trim).filter(|n| !n.is_empty()) {
            None | Some("parentbased_always_on") => Sampler::ParentBased(Root::AlwaysOn),
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::Ratio(ratio()?),
            Some("parentbased_always_off") => Sampler::ParentBased(Root::AlwaysOff),
            Some("parentbased_traceidratio") => Sampler::ParentBased(Root::Ratio(ratio()?)),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?}: use always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        })
    }

    /// Parent-based with this ratio for new traces (what control sets mesh-wide).
    pub fn parent_based_ratio(ratio: f64) -> Sampler {
        Sampler::ParentBased(Root::Ratio(ratio.clamp(0.0, 1.0)))
    }

    /// Whether to record a span of `trace_id`, given the caller's decision if any.
    pub fn sample(&self, trace_id: TraceId, parent: Option<bool>) -> bool {
        match (self, parent) {
            (Sampler::AlwaysOn, _) => true,
            (Sampler::AlwaysOff, _) => false,
            (Sampler::Ratio(r), _) => by_ratio(*r, trace_id),
            (Sampler::ParentBased(_), Some(p)) => p,
            (Sampler::ParentBased(Root::AlwaysOn), None) => true,
            (Sampler::ParentBased(Root::AlwaysOff), None) => false,
            (Sampler::ParentBased(Root::Ratio(r)), None) => by_ratio(*r, trace_id),
        }
    }
}

/// The SDK's TraceIdRatioBased: the low 63 bits of the trace id against the ratio, so every
/// hop decides the same for one trace.
fn by_ratio(ratio: f64, trace_id: TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    (low >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_parse() {
        assert_eq!(
            Sampler::from_env_values(None, None),
            Ok(Sampler::ParentBased(Root::AlwaysOn))
        );
        assert_eq!(
            Sampler::from_env_values(Some("parentbased_traceidratio"), Some("0.01")),
            Ok(Sampler::ParentBased(Root::Ratio(0.01)))
        );
        assert_eq!(
            Sampler::from_env_values(Some("always_off"), None),
            Ok(Sampler::AlwaysOff)
        );
        assert!(Sampler::from_env_values(Some("traceidratio"), Some("2")).is_err());
        assert!(Sampler::from_env_values(Some("sometimes"), None).is_err());
    }

    #[test]
    fn parent_decides_and_the_ratio_holds_for_new_traces() {
        let s = Sampler::parent_based_ratio(0.25);
        let id = TraceId::from(0x1234u128);
        assert!(s.sample(id, Some(true)));
        assert!(!s.sample(id, Some(false)));
        let n = (0..10_000u128)
            .filter(|i| {
                s.sample(
                    TraceId::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)),
                    None,
                )
            })
            .count();
        assert!((2_200..=2_800).contains(&n), "{n} of 10000 at 0.25");
        assert!(Sampler::AlwaysOn.sample(id, Some(false)));
        assert!(!Sampler::AlwaysOff.sample(id, Some(true)));
    }
}
