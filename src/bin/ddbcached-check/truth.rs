//! After quiescence: what DynamoDB holds against what the run acknowledged (durability,
//! indices without gaps) and against what every daemon answers (convergence).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use ddbcached::store::kv::KvStore;
use ddbcached::store::log::LogStore;
use ddbcached_protocol::Client;
use futures::TryStreamExt;

use crate::history::{kv_value, History};
use crate::verify::Verdict;
use crate::workload::Names;

/// The stores, read directly and consistently.
pub struct Truth {
    pub kv: KvStore,
    pub log: LogStore,
}

impl Truth {
    /// Compares DynamoDB with the history and with every daemon, adding violations to
    /// `verdict`. Returns how many answers were compared.
    pub async fn compare(
        &self,
        verdict: &mut Verdict,
        history: &History,
        names: &Names,
        keys: usize,
        topics: usize,
        sockets: &[PathBuf],
    ) -> anyhow::Result<usize> {
        let mut daemons = Vec::new();
        for socket in sockets {
            daemons.push(Client::connect_as(socket, "ddbcached-check").await?);
        }
        let ns = names.namespace();
        let mut compared = 0;
        for k in 0..keys {
            let key = names.key(k);
            let versions = self
                .kv
                .versions_with_values(&ns, &key)
                .await
                .context("reading a key's versions from DynamoDB")?;
            self.kv_durability(verdict, history, names, k, &versions);
            let newest = versions.last().map(|(ts, v)| (*ts, v.clone()));
            let timestamps: Vec<i64> = versions.iter().map(|(ts, _)| *ts).collect();
            for (d, daemon) in daemons.iter().enumerate() {
                let got = daemon
                    .kv_get(&ns, key.clone(), None)
                    .await?
                    .map(|v| (v.ts, v.value));
                let latest = daemon.kv_latest_ts(&ns, key.clone()).await?;
                let all = daemon.kv_timestamps(&ns, key.clone()).await?;
                compared += 3;
                if got != newest
                    || latest != newest.as_ref().map(|(ts, _)| *ts)
                    || all != timestamps
                {
                    verdict.violation(
                        "kv: daemon differs from DynamoDB after quiescence",
                        vec![format!(
                            "k{k} on daemon {d}: newest {:?}, latest_ts {latest:?}, {} timestamps; DynamoDB: newest {:?}, {} timestamps",
                            got.map(|(ts, _)| ts),
                            all.len(),
                            newest.as_ref().map(|(ts, _)| *ts),
                            timestamps.len()
                        )],
                    );
                }
            }
        }
        for t in 0..topics {
            let topic = names.topic(t);
            let position = self.log.position(&topic).await?;
            let values: Vec<Bytes> = self
                .log
                .scan(&topic, 1, i64::MAX)
                .try_concat()
                .await
                .context("reading a topic from DynamoDB")?;
            self.log_allocation(verdict, history, t, position, &values);
            for (d, daemon) in daemons.iter().enumerate() {
                let p = daemon.log_position(&topic).await?;
                let got = daemon.log_scan(&topic, 1, i64::MAX).await?;
                compared += 2;
                if p != position || got != values {
                    verdict.violation(
                        "log: daemon differs from DynamoDB after quiescence",
                        vec![format!(
                            "t{t} on daemon {d}: position {p}, {} entries; DynamoDB: position {position}, {} entries",
                            got.len(),
                            values.len()
                        )],
                    );
                }
            }
        }
        Ok(compared)
    }

    /// Every acknowledged version is in DynamoDB with its value; every version there was
    /// written by this run.
    fn kv_durability(
        &self,
        verdict: &mut Verdict,
        history: &History,
        names: &Names,
        key: usize,
        versions: &[(i64, Bytes)],
    ) {
        let stored: HashMap<i64, &Bytes> = versions.iter().map(|(ts, v)| (*ts, v)).collect();
        let written: HashSet<i64> = history
            .kv_writes
            .iter()
            .filter(|w| w.key == key)
            .map(|w| w.ts)
            .collect();
        for w in history.kv_writes.iter().filter(|w| w.key == key && w.acked) {
            if stored.get(&w.ts) != Some(&&kv_value(&names.run, w.ts)) {
                verdict.violation(
                    "kv: acknowledged write missing from DynamoDB",
                    vec![format!(
                        "k{key} ts={} on daemon {}: DynamoDB holds {:?}",
                        w.ts,
                        w.daemon,
                        stored.get(&w.ts)
                    )],
                );
            }
        }
        for (ts, _) in versions.iter().filter(|(ts, _)| !written.contains(ts)) {
            verdict.violation(
                "kv: DynamoDB holds a version nobody wrote",
                vec![format!("k{key} ts={ts}")],
            );
        }
    }

    /// Indices 1..=position each hold one append's value, every acknowledged append at
    /// its index: no gap, no duplicate, nothing lost.
    fn log_allocation(
        &self,
        verdict: &mut Verdict,
        history: &History,
        topic: usize,
        position: i64,
        values: &[Bytes],
    ) {
        if values.len() as i64 != position {
            verdict.violation(
                "log: gap in DynamoDB",
                vec![format!(
                    "t{topic}: position {position} but {} entries",
                    values.len()
                )],
            );
        }
        let appends: HashMap<&Bytes, Option<i64>> = history
            .log_appends
            .iter()
            .filter(|a| a.topic == topic)
            .map(|a| (&a.value, a.index))
            .collect();
        for (index, value) in (1..).zip(values) {
            match appends.get(value) {
                None => verdict.violation(
                    "log: DynamoDB holds a value nobody appended",
                    vec![format!("t{topic} index {index}")],
                ),
                Some(Some(acked)) if *acked != index => verdict.violation(
                    "log: acknowledged index differs from DynamoDB",
                    vec![format!(
                        "t{topic}: acknowledged index {acked}, stored at {index}"
                    )],
                ),
                Some(_) => {}
            }
        }
        let stored: HashSet<&Bytes> = values.iter().collect();
        for a in history
            .log_appends
            .iter()
            .filter(|a| a.topic == topic && a.index.is_some())
        {
            if !stored.contains(&a.value) {
                verdict.violation(
                    "log: acknowledged append missing from DynamoDB",
                    vec![format!(
                        "t{topic} index {:?} on daemon {}",
                        a.index, a.daemon
                    )],
                );
            }
        }
    }
}
