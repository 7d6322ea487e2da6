//! Building `TableUpdate` messages from pre-encoded parts.
//!
//! Protobuf encodes a repeated message field as one `(tag, length, bytes)` record per element,
//! so an update can be assembled by concatenating service ports that were each encoded once when
//! they changed. Control keeps every service port as encoded [`Bytes`]; a snapshot is then a
//! series of memory copies and a delta costs the same for one subscriber or a thousand.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::discovery::{
    AuthorizationPolicy, Node, ServicePort, ServicePortKey, TableUpdate, WasmPlugin,
    table_update::Kind,
};

const VERSION: u32 = 1;
const KIND: u32 = 2;
const SERVICE_PORTS: u32 = 3;
const REMOVED_SERVICE_PORTS: u32 = 4;
const NODES: u32 = 5;
const REMOVED_NODES: u32 = 6;
const COMPLETE: u32 = 7;
const WASM_PLUGINS: u32 = 8;
const REMOVED_WASM_PLUGINS: u32 = 9;
const AUTHORIZATION_POLICIES: u32 = 10;
const REMOVED_AUTHORIZATION_POLICIES: u32 = 11;
const MESH_CONFIG: u32 = 20;

/// Encodes one service port for later inclusion in updates.
pub fn encode_service_port(port: &ServicePort) -> Bytes {
    port.encode_to_vec().into()
}

/// Encodes one node for later inclusion in updates.
pub fn encode_node(node: &Node) -> Bytes {
    node.encode_to_vec().into()
}

/// Encodes one WasmPlugin for later inclusion in updates.
pub fn encode_wasm_plugin(plugin: &WasmPlugin) -> Bytes {
    plugin.encode_to_vec().into()
}

/// Encodes one AuthorizationPolicy for later inclusion in updates.
pub fn encode_authorization_policy(policy: &AuthorizationPolicy) -> Bytes {
    policy.encode_to_vec().into()
}

/// Incrementally writes one encoded `TableUpdate`.
#[derive(Debug)]
pub struct UpdateWriter {
    buf: BytesMut,
}

impl UpdateWriter {
    pub fn new(version: u64, kind: Kind, capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + 16);
        if version != 0 {
            encode_key(VERSION, WireType::Varint, &mut buf);
            encode_varint(version, &mut buf);
        }
        encode_key(KIND, WireType::Varint, &mut buf);
        encode_varint(kind as i32 as u64, &mut buf);
        Self { buf }
    }

    fn put_message(&mut self, tag: u32, bytes: &[u8]) {
        encode_key(tag, WireType::LengthDelimited, &mut self.buf);
        encode_varint(bytes.len() as u64, &mut self.buf);
        self.buf.put_slice(bytes);
    }

    /// Adds a service port encoded by [`encode_service_port`].
    pub fn service_port(&mut self, encoded: &[u8]) {
        self.put_message(SERVICE_PORTS, encoded);
    }

    pub fn removed_service_port(&mut self, key: &ServicePortKey) {
        let mut tmp = Vec::with_capacity(key.encoded_len());
        key.encode(&mut tmp).expect("Vec grows");
        self.put_message(REMOVED_SERVICE_PORTS, &tmp);
    }

    /// Adds a node encoded by [`encode_node`].
    pub fn node(&mut self, encoded: &[u8]) {
        self.put_message(NODES, encoded);
    }

    pub fn removed_node(&mut self, name: &str) {
        self.put_message(REMOVED_NODES, name.as_bytes());
    }

    /// Adds a WasmPlugin encoded by [`encode_wasm_plugin`].
    pub fn wasm_plugin(&mut self, encoded: &[u8]) {
        self.put_message(WASM_PLUGINS, encoded);
    }

    /// A WasmPlugin removed, as `namespace/name`.
    pub fn removed_wasm_plugin(&mut self, id: &str) {
        self.put_message(REMOVED_WASM_PLUGINS, id.as_bytes());
    }

    /// The mesh-wide settings (an encoded `MeshConfig`).
    pub fn mesh_config(&mut self, encoded: &[u8]) {
        self.put_message(MESH_CONFIG, encoded);
    }

    /// Adds an AuthorizationPolicy encoded by [`encode_authorization_policy`].
    pub fn authorization_policy(&mut self, encoded: &[u8]) {
        self.put_message(AUTHORIZATION_POLICIES, encoded);
    }

    /// An AuthorizationPolicy removed, as `namespace/name`.
    pub fn removed_authorization_policy(&mut self, id: &str) {
        self.put_message(REMOVED_AUTHORIZATION_POLICIES, id.as_bytes());
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The size a further record of `len` payload bytes will take.
    pub fn record_len(len: usize) -> usize {
        1 + encoded_len_varint(len as u64) + len
    }

    pub fn finish(mut self, complete: bool) -> Bytes {
        if complete {
            encode_key(COMPLETE, WireType::Varint, &mut self.buf);
            encode_varint(1, &mut self.buf);
        }
        self.buf.freeze()
    }
}

/// Decodes an update (what a client's codec does; handy in tests and tools).
pub fn decode_update(bytes: &[u8]) -> Result<TableUpdate, prost::DecodeError> {
    TableUpdate::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Protocol;

    #[test]
    fn assembled_update_decodes_like_a_built_one() {
        let key = ServicePortKey {
            namespace: "default".into(),
            service: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp as i32,
        };
        let sp = ServicePort {
            key: Some(key.clone()),
            port: 80,
            cluster_ips: vec![vec![10, 96, 0, 1]],
            ..Default::default()
        };
        let node = Node {
            name: "n1".into(),
            zone: "z".into(),
            addresses: vec![],
        };
        let mut w = UpdateWriter::new(7, Kind::Delta, 0);
        w.service_port(&encode_service_port(&sp));
        w.removed_service_port(&key);
        w.node(&encode_node(&node));
        w.removed_node("gone");
        let plugin = WasmPlugin {
            namespace: "demo".into(),
            name: "auth".into(),
            sha256: "ab".repeat(32),
            module_size: 8,
            plugin_config: br#"{"a":1}"#.to_vec(),
            ..Default::default()
        };
        w.wasm_plugin(&encode_wasm_plugin(&plugin));
        w.removed_wasm_plugin("demo/old");
        let mesh = crate::discovery::MeshConfig {
            otlp_endpoint: "http://collector:4317".into(),
            otlp_protocol: "grpc".into(),
            trace_sampling: 0.1,
            has_trace_sampling: true,
        };
        w.mesh_config(&mesh.encode_to_vec());
        let policy = AuthorizationPolicy {
            namespace: "demo".into(),
            name: "web".into(),
            selector: [("app".to_string(), "web".to_string())].into(),
            mtls: crate::discovery::authorization_policy::Mtls::Strict as i32,
            has_rules: true,
            rules: vec![crate::discovery::AuthorizationRule {
                from: vec!["ns/ops".into()],
                any_client: false,
                ports: vec![8080],
            }],
        };
        w.authorization_policy(&encode_authorization_policy(&policy));
        w.removed_authorization_policy("demo/gone");
        let got = decode_update(&w.finish(true)).unwrap();
        let want = TableUpdate {
            version: 7,
            kind: Kind::Delta as i32,
            service_ports: vec![sp],
            removed_service_ports: vec![key],
            nodes: vec![node],
            removed_nodes: vec!["gone".into()],
            wasm_plugins: vec![plugin],
            removed_wasm_plugins: vec!["demo/old".into()],
            authorization_policies: vec![policy],
            removed_authorization_policies: vec!["demo/gone".into()],
            complete: true,
            mesh_config: Some(mesh),
        };
        assert_eq!(got, want);
    }
}
