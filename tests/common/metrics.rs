//! Reading what tollgate records, through `metrics-util`'s debugging recorder (feature
//! `metrics`).

use std::collections::BTreeMap;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Every metric recorded: name and sorted labels → value.
pub type Recorded = BTreeMap<(String, Vec<(String, String)>), DebugValue>;

pub fn recorded(snapshotter: &Snapshotter) -> Recorded {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

/// Runs `script` on a current-thread runtime with a debugging recorder on this thread.
pub fn with_recorder(script: impl std::future::Future<Output = ()>) -> Recorded {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(script));
    recorded(&snapshotter)
}

/// A metric without labels (a gauge, or a counter set as a total), if recorded.
pub fn unlabelled(recorded: &Recorded, name: &str) -> Option<f64> {
    match recorded.get(&(name.to_owned(), vec![]))? {
        DebugValue::Gauge(v) => Some(v.into_inner()),
        DebugValue::Counter(n) => Some(*n as f64),
        other => panic!("{name}: {other:?}"),
    }
}
