//! Which pods should exist: the folder's Pods, and each Deployment's replicas, like the
//! ReplicaSet controller would keep them. Pure: the current pods in, what to create and what to
//! delete out.
//!
//! - A Deployment's pods are named `<deployment>-<template hash>-<5 random>` and labelled
//!   `pod-template-hash`; pods of an older template are replaced (all at once, not rolled).
//! - Scaling down deletes not-ready pods first, then the newest.
//! - Terminating pods no longer count; failed pods do (they stay, shown as Failed, until
//!   deleted), so a pod that cannot start is not recreated in a loop.
//! - A Pod from the folder that changed is deleted and, once gone, created again.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rand::Rng;

use crate::manifests::{Manifests, NsName};

/// The label a Deployment's pods carry, as in Kubernetes.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Who made a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A Pod in the folder.
    Folder,
    /// A Deployment's replica, of the template with this hash.
    Deployment { name: String, hash: String },
}

/// A pod to create.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    pub key: NsName,
    pub owner: Owner,
    /// Labels, annotations and spec as the pod will have them.
    pub meta: ObjectMeta,
    pub spec: PodSpec,
    /// Changes when the pod's definition does.
    pub spec_hash: String,
}

/// What the planner needs to know about a pod that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Existing {
    pub key: NsName,
    pub owner: Owner,
    pub spec_hash: String,
    pub terminating: bool,
    pub ready: bool,
    /// Creation order: higher is newer.
    pub seq: u64,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<PodPlan>,
    /// With the reason, for the log.
    pub delete: Vec<(NsName, String)>,
}

/// Decides what to create and delete so that the pods match the folder.
pub fn plan(manifests: &Manifests, existing: &[Existing], rng: &mut impl Rng) -> Plan {
    let mut out = Plan::default();
    let by_key: BTreeMap<&NsName, &Existing> = existing.iter().map(|e| (&e.key, e)).collect();
    let mut taken: BTreeSet<NsName> = existing.iter().map(|e| e.key.clone()).collect();

    // Pods from the folder.
    for (key, pod) in &manifests.pods {
        let plan = folder_pod(key, pod);
        match by_key.get(key) {
            None => {
                taken.insert(key.clone());
                out.create.push(plan);
            }
            Some(e) if e.terminating => {} // created again once it is gone
            Some(e) if e.owner != Owner::Folder || e.spec_hash != plan.spec_hash => {
                out.delete
                    .push((key.clone(), "its definition changed".into()));
            }
            Some(_) => {}
        }
    }

    // Deployments.
    let mut wanted_owner: BTreeSet<(String, String)> = BTreeSet::new();
    for (key, d) in &manifests.deployments {
        wanted_owner.insert((key.namespace.clone(), key.name.clone()));
        let Some(template) = deployment_template(key, d) else {
            continue;
        };
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
        let mut current: Vec<&Existing> = Vec::new();
        for e in existing
            .iter()
            .filter(|e| e.key.namespace == key.namespace && !e.terminating)
        {
            let Owner::Deployment { name, hash } = &e.owner else {
                continue;
            };
            if name != &key.name {
                continue;
            }
            if hash != &template.spec_hash {
                out.delete.push((
                    e.key.clone(),
                    format!("Deployment {key} has a new template"),
                ));
            } else {
                current.push(e);
            }
        }
        if current.len() > replicas {
            // Not ready first, then the newest.
            current.sort_by_key(|e| (e.ready, std::cmp::Reverse(e.seq)));
            for e in &current[..current.len() - replicas] {
                out.delete.push((
                    e.key.clone(),
                    format!("Deployment {key} scaled to {replicas}"),
                ));
            }
        }
        for _ in current.len()..replicas {
            let name = loop {
                let candidate = format!("{}-{}-{}", key.name, template.spec_hash, suffix(rng, 5));
                let k = NsName::new(&key.namespace, candidate);
                if !taken.contains(&k) {
                    break k;
                }
            };
            taken.insert(name.clone());
            let mut p = template.clone();
            p.meta.name = Some(name.name.clone());
            p.key = name;
            out.create.push(p);
        }
    }

    // Pods nobody asks for any more.
    for e in existing.iter().filter(|e| !e.terminating) {
        let gone = match &e.owner {
            Owner::Folder => !manifests.pods.contains_key(&e.key),
            Owner::Deployment { name, .. } => {
                !wanted_owner.contains(&(e.key.namespace.clone(), name.clone()))
            }
        };
        if gone {
            out.delete
                .push((e.key.clone(), "it is no longer in the folder".into()));
        }
    }
    out
}

fn folder_pod(key: &NsName, pod: &Pod) -> PodPlan {
    let mut meta = ObjectMeta {
        name: Some(key.name.clone()),
        namespace: Some(key.namespace.clone()),
        labels: pod.metadata.labels.clone(),
        annotations: pod.metadata.annotations.clone(),
        ..Default::default()
    };
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let spec_hash = hash_of(&(&meta.labels, &meta.annotations, &spec));
    PodPlan {
        key: key.clone(),
        owner: Owner::Folder,
        meta,
        spec,
        spec_hash,
    }
}

/// A Deployment's pod, without its name yet.
fn deployment_template(key: &NsName, d: &Deployment) -> Option<PodPlan> {
    let spec = d.spec.as_ref()?;
    let tmeta = spec.template.metadata.clone().unwrap_or_default();
    let pspec = spec.template.spec.clone()?;
    let hash = hash_of(&(&tmeta.labels, &tmeta.annotations, &pspec));
    let mut labels = tmeta.labels.clone().unwrap_or_default();
    labels.insert(TEMPLATE_HASH_LABEL.to_string(), hash.clone());
    Some(PodPlan {
        key: key.clone(),
        owner: Owner::Deployment {
            name: key.name.clone(),
            hash: hash.clone(),
        },
        meta: ObjectMeta {
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            annotations: tmeta.annotations,
            ..Default::default()
        },
        spec: pspec,
        spec_hash: hash,
    })
}

/// Kubernetes' "safe" alphabet for generated names (no vowels, no look-alikes).
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn suffix(rng: &mut impl Rng, n: usize) -> String {
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A stable short hash of anything serializable, in the safe alphabet (like pod-template-hash).
pub fn hash_of(value: &impl serde::Serialize) -> String {
    let json = serde_json::to_string(value).unwrap_or_default();
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let mut h = Fnv::default();
    json.hash(&mut h);
    let mut n = h.finish();
    let mut out = String::new();
    for _ in 0..10 {
        out.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
    }
    out
}

/// FNV-1a, for names and addresses that must not change between runs.
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{Manifest, Outcome, parse_text};
    use rand::SeedableRng;

    fn manifests(yaml: &str) -> Manifests {
        let mut m = Manifests::default();
        for d in parse_text(yaml) {
            let Outcome::Objects(objs) = d.outcome else {
                panic!("{d:?}");
            };
            for o in objs {
                match o {
                    Manifest::Pod(k, p) => {
                        m.pods.insert(k, *p);
                    }
                    Manifest::Deployment(k, d) => {
                        m.deployments.insert(k, *d);
                    }
                    _ => {}
                }
            }
        }
        m
    }

    fn deployment(replicas: u32, cmd: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: demo}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: c, command: [{cmd}]}}]}}\n"
        )
    }

    fn existing(plan: &PodPlan, seq: u64, ready: bool) -> Existing {
        Existing {
            key: plan.key.clone(),
            owner: plan.owner.clone(),
            spec_hash: plan.spec_hash.clone(),
            terminating: false,
            ready,
            seq,
        }
    }

    #[test]
    fn a_deployment_gets_its_replicas_and_scales_down_newest_not_ready_first() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let m = manifests(&deployment(3, "sleep"));
        let p = plan(&m, &[], &mut rng);
        assert_eq!(p.create.len(), 3);
        assert!(p.delete.is_empty());
        let names: BTreeSet<_> = p.create.iter().map(|c| c.key.name.clone()).collect();
        assert_eq!(names.len(), 3);
        for c in &p.create {
            let hash = &c.spec_hash;
            assert!(c.key.name.starts_with(&format!("web-{hash}-")), "{}", c.key);
            assert_eq!(
                c.meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(TEMPLATE_HASH_LABEL)),
                Some(hash)
            );
            assert_eq!(
                c.meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app"))
                    .map(String::as_str),
                Some("web")
            );
        }
        let mut now: Vec<Existing> = p
            .create
            .iter()
            .enumerate()
            .map(|(i, c)| existing(c, i as u64, true))
            .collect();
        assert_eq!(plan(&m, &now, &mut rng), Plan::default());

        // Scale to 1: the not-ready one goes first, then the newest.
        now[0].ready = false;
        let m1 = manifests(&deployment(1, "sleep"));
        let p = plan(&m1, &now, &mut rng);
        let deleted: Vec<_> = p.delete.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(deleted, vec![now[0].key.clone(), now[2].key.clone()]);
        assert!(p.delete[0].1.contains("scaled to 1"));

        // Terminating pods do not count: a deleted pod is replaced.
        now[1].terminating = true;
        let p = plan(&m, &now, &mut rng);
        assert_eq!(p.create.len(), 1);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn a_new_template_replaces_the_pods_and_a_removed_deployment_deletes_them() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let m = manifests(&deployment(2, "sleep"));
        let first = plan(&m, &[], &mut rng);
        let now: Vec<Existing> = first
            .create
            .iter()
            .enumerate()
            .map(|(i, c)| existing(c, i as u64, true))
            .collect();
        let m2 = manifests(&deployment(2, "'true'"));
        let p = plan(&m2, &now, &mut rng);
        assert_eq!(p.delete.len(), 2);
        assert_eq!(p.create.len(), 2);
        assert_ne!(p.create[0].spec_hash, first.create[0].spec_hash);

        let p = plan(&Manifests::default(), &now, &mut rng);
        assert_eq!(p.delete.len(), 2);
        assert!(p.create.is_empty());
    }

    #[test]
    fn folder_pods_are_created_replaced_when_changed_and_deleted_when_removed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let pod = |cmd: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: demo}}\nspec: {{containers: [{{name: c, command: [{cmd}]}}]}}\n"
            )
        };
        let m = manifests(&pod("sleep"));
        let p = plan(&m, &[], &mut rng);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].key, NsName::new("demo", "p"));
        let mut now = vec![existing(&p.create[0], 0, true)];
        assert_eq!(plan(&m, &now, &mut rng), Plan::default());

        let changed = manifests(&pod("'true'"));
        let p = plan(&changed, &now, &mut rng);
        assert_eq!(p.delete.len(), 1);
        assert!(p.create.is_empty());
        now[0].terminating = true;
        assert_eq!(plan(&changed, &now, &mut rng), Plan::default());
        let p = plan(&changed, &[], &mut rng);
        assert_eq!(p.create.len(), 1);

        now[0].terminating = false;
        let p = plan(&Manifests::default(), &now, &mut rng);
        assert_eq!(p.delete.len(), 1);
    }

    #[test]
    fn template_hashes_are_stable_names() {
        let a = hash_of(&("x", 1));
        assert_eq!(a, hash_of(&("x", 1)));
        assert_ne!(a, hash_of(&("x", 2)));
        assert_eq!(a.len(), 10);
        assert!(a.bytes().all(|b| ALPHABET.contains(&b)));
    }
}
