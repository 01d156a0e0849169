//! The frozen LPM-trie program (`smtpguard-ebpf/src/bin/trie-reference.rs`,
//! XDP program `smtpguard_trie`) loaded from its own object with a list in
//! its generation-A tries: the lookup oracle's kernel reference and the
//! bench's "old trie program". `cargo xtask build` builds the object.

use std::path::{Path, PathBuf};

use aya::{
    maps::{lpm_trie::Key, Array, LpmTrie, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf,
};
use ipnet::IpNet;
use smtpguard_common::{map_names, Action, Enforcement, Mode, Rule, RuntimeConfig};

/// The frozen program's runtime record: an array map of this name (the
/// production program's is a global, `map_names::CONFIG`).
pub const CONFIG_MAP: &str = "SG_CONFIG";

/// The program, loaded and verified, not attached.
pub struct TrieReference {
    ebpf: Ebpf,
}

impl TrieReference {
    /// The XDP program's name in the object.
    pub const PROGRAM: &str = "smtpguard_trie";

    /// Where `cargo xtask build` puts the object (`SMTPGUARD_TRIE_OBJECT`
    /// overrides).
    pub fn object() -> PathBuf {
        std::env::var_os("SMTPGUARD_TRIE_OBJECT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/bpf/bpfel-unknown-none/release/trie-reference")
            })
    }

    /// The program, loaded and verified, with empty tries; zeroed config
    /// (accept all, no ports) until [`TrieReference::set_runtime`].
    ///
    /// # Panics
    ///
    /// If the object is missing or the verifier refuses it.
    pub fn empty() -> TrieReference {
        let path = Self::object();
        let mut ebpf = Ebpf::load_file(&path)
            .unwrap_or_else(|e| panic!("{} (`cargo xtask build` builds it): {e}", path.display()));
        let program: &mut Xdp = ebpf
            .program_mut(Self::PROGRAM)
            .expect("the object holds smtpguard_trie")
            .try_into()
            .expect("an XDP program");
        program.load().expect("trie-reference passes the verifier");
        TrieReference { ebpf }
    }

    /// Loads the program with `rules` (canonical prefixes, one action each,
    /// rule ids 1, 2, ... in order) in its tries, as [`TrieReference::empty`].
    ///
    /// # Panics
    ///
    /// As [`TrieReference::empty`], or if a trie is full.
    pub fn load(rules: &[(IpNet, Action)]) -> TrieReference {
        let mut reference = Self::empty();
        for (id, (net, action)) in rules.iter().enumerate() {
            reference.insert(
                *net,
                Rule {
                    action: *action as u32,
                    rule_id: id as u32 + 1,
                },
            );
        }
        reference
    }

    /// Writes one prefix into generation A's trie of its family.
    ///
    /// # Panics
    ///
    /// If the trie refuses it (full).
    pub fn insert(&mut self, net: IpNet, rule: Rule) {
        let result = match net {
            IpNet::V4(n) => self.trie::<4>("SG_RULES4_A").insert(
                &Key::new(n.prefix_len().into(), n.network().octets()),
                rule,
                0,
            ),
            IpNet::V6(n) => self.trie::<16>("SG_RULES6_A").insert(
                &Key::new(n.prefix_len().into(), n.network().octets()),
                rule,
                0,
            ),
        };
        result.unwrap_or_else(|e| panic!("trie-reference: inserting {net}: {e}"));
    }

    /// Takes one prefix out of generation A's trie of its family.
    ///
    /// # Panics
    ///
    /// If it is not there.
    pub fn remove(&mut self, net: IpNet) {
        let result = match net {
            IpNet::V4(n) => self
                .trie::<4>("SG_RULES4_A")
                .remove(&Key::new(n.prefix_len().into(), n.network().octets())),
            IpNet::V6(n) => self
                .trie::<16>("SG_RULES6_A")
                .remove(&Key::new(n.prefix_len().into(), n.network().octets())),
        };
        result.unwrap_or_else(|e| panic!("trie-reference: removing {net}: {e}"));
    }

    /// The trie map `name`, keyed by `N`-byte addresses.
    fn trie<const N: usize>(&mut self, name: &str) -> LpmTrie<&mut MapData, [u8; N], Rule> {
        LpmTrie::try_from(self.ebpf.map_mut(name).expect(name)).expect("an LPM trie")
    }

    /// Hits of `rule_id` (the program's shared hit array).
    pub fn hits(&self, rule_id: u32) -> u64 {
        let hits: Array<&MapData, u64> =
            Array::try_from(self.ebpf.map(map_names::HITS).expect("map")).expect("array");
        hits.get(&rule_id, 0).unwrap_or(0)
    }

    /// Mode, enforcement, one guarded port (host order) and the log rate.
    pub fn set_runtime(&mut self, mode: Mode, enforcement: Enforcement, port: u16, log_rate: u32) {
        let mut cfg = RuntimeConfig::zeroed();
        cfg.mode = mode as u32;
        cfg.enforcement = enforcement as u32;
        cfg.port_count = 1;
        cfg.ports[0] = port.to_be();
        cfg.log_rate_per_sec = log_rate;
        self.set_runtime_record(cfg);
    }

    /// Writes a whole runtime record, its generation forced to A (where
    /// the tries are filled).
    pub fn set_runtime_record(&mut self, mut cfg: RuntimeConfig) {
        cfg.active_generation = 0;
        let mut config: Array<&mut MapData, RuntimeConfig> =
            Array::try_from(self.ebpf.map_mut(CONFIG_MAP).expect(CONFIG_MAP)).unwrap();
        config.set(0, cfg, 0).expect("writing the runtime record");
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(Self::PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    /// Runs `frame` `repeat` times: (verdict, the kernel's mean ns per run).
    pub fn run(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64), aya::programs::ProgramError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let r = self.program().test_run(opts)?;
        Ok((r.return_value, r.duration.as_nanos() as u64))
    }

    /// Live-frames mode, `batch` frames per batch: the kernel's mean ns per frame.
    pub fn run_live(
        &mut self,
        frame: &[u8],
        repeat: u32,
        batch: u32,
    ) -> Result<u64, aya::programs::ProgramError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(batch);
        Ok(self.program().test_run(opts)?.duration.as_nanos() as u64)
    }

    /// Its counter `index` (the old layout: `smtpguard_common::counter`),
    /// summed over CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("SG_COUNTERS").expect("SG_COUNTERS")).unwrap();
        counters.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}
