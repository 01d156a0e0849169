//! The XDP programs the kernel figures are measured on, behind one trait:
//! smtpguard's filter, the bare `XDP_DROP` program of the same object, and
//! xdp-filter's deny-by-IP program (Debian's libxdp1 object) loaded by aya
//! with the same list as exact addresses. Also: the kernel memory of the
//! maps a load created, from `/proc/self/fdinfo`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use smtpguard::kernel::XdpFilter;
use smtpguard_tests::trie_reference::TrieReference;

/// An XDP program that can be test-run on a frame.
pub trait PacketProgram {
    /// Runs `frame` `repeat` times: (verdict, kernel's mean ns per run).
    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, u64)>;
    /// Live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`), batches of 64:
    /// the kernel's mean ns per frame.
    fn run_live(&mut self, frame: &[u8], repeat: u32) -> Result<u64>;
}

/// Frames per batch in live-frames mode (the kernel's NAPI budget).
pub const LIVE_BATCH: u32 = 64;

impl PacketProgram for XdpFilter {
    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
        Ok(self.test_run_repeat(frame, repeat)?)
    }

    fn run_live(&mut self, frame: &[u8], repeat: u32) -> Result<u64> {
        Ok(self.test_run_live(frame, repeat, LIVE_BATCH)?)
    }
}

/// The frozen LPM-trie program: the "old trie program" of every row.
impl PacketProgram for TrieReference {
    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
        Ok(TrieReference::run(self, frame, repeat)?)
    }

    fn run_live(&mut self, frame: &[u8], repeat: u32) -> Result<u64> {
        Ok(TrieReference::run_live(self, frame, repeat, LIVE_BATCH)?)
    }
}

/// A program aya loaded from an object that is not smtpguard's filter.
pub struct AyaProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl AyaProgram {
    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(self.name)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    fn load(mut ebpf: Ebpf, name: &'static str) -> Result<AyaProgram> {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading {name} into the kernel"))?;
        Ok(AyaProgram { ebpf, name })
    }

    /// Attaches to `interface` (in the calling thread's network namespace)
    /// for as long as this value lives.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        self.program()
            .attach(interface, mode)
            .with_context(|| format!("attaching {} to {interface}", self.name))?;
        Ok(())
    }
}

impl PacketProgram for AyaProgram {
    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let r = self.program().test_run(opts)?;
        Ok((r.return_value, r.duration.as_nanos() as u64))
    }

    fn run_live(&mut self, frame: &[u8], repeat: u32) -> Result<u64> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(LIVE_BATCH);
        Ok(self.program().test_run(opts)?.duration.as_nanos() as u64)
    }
}

/// `smtpguard_drop_all` from the bench's own XDP object (see
/// [`crate::drop_all_object`]): returns `XDP_DROP` and nothing else, the
/// floor every per-packet figure is compared with.
pub fn drop_all() -> Result<AyaProgram> {
    let path = crate::drop_all_object();
    let ebpf = Ebpf::load_file(&path)
        .with_context(|| format!("loading {} (`cargo xtask bench` builds it)", path.display()))?;
    AyaProgram::load(ebpf, "smtpguard_drop_all")
}

/// xdp-filter's IP filter with policy "allow" (`xdpfilt_alw_ip.o`, shipped
/// by Debian's libxdp1 for `xdp-filter load -p allow -f ip`: packets that
/// match no rule pass, the listed addresses are dropped; `-p deny` is the
/// opposite, a default-deny allow list), loaded by aya. The object
/// asks for its maps to be pinned by name, so they are pinned in a private
/// bpffs instance, unmounted on drop (never in a shared `/sys/fs/bpf`).
pub struct XdpFilterPeer {
    /// The program (dropped before the bpffs goes).
    pub program: AyaProgram,
    _bpffs: PrivateBpffs,
    /// The object file it came from.
    pub object: PathBuf,
}

/// The object file and the program inside it.
const XDPFILT_OBJECT: &str = "xdpfilt_alw_ip.o";
const XDPFILT_PROGRAM: &str = "xdpfilt_alw_ip";
/// xdp-filter's value bit "match the source address" (`MAP_FLAG_SRC`).
const XDPFILT_FLAG_SRC: u64 = 1;
/// xdp-filter's compiled-in map size, which its CLI cannot change.
pub const XDPFILT_DEFAULT_ENTRIES: u32 = 10_000;

/// Finds xdp-filter's object where Debian and upstream install it.
pub fn xdpfilt_object() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/usr/lib/bpf", "/usr/share/xdp-tools", "/usr/local/lib/bpf"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("bpf")));
    }
    dirs.into_iter()
        .map(|d| d.join(XDPFILT_OBJECT))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("{XDPFILT_OBJECT} not found (Debian packages xdp-tools, libxdp1)"))
}

impl XdpFilterPeer {
    /// Loads the program with room for `addrs` (at least xdp-filter's own
    /// 10,000 per family) and fills its maps with them.
    pub fn load(addrs: &[IpAddr]) -> Result<XdpFilterPeer> {
        let object = xdpfilt_object()?;
        let bpffs = PrivateBpffs::mount()?;
        let v4 = addrs.iter().filter(|a| a.is_ipv4()).count() as u32;
        let v6 = addrs.len() as u32 - v4;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&bpffs.0)
            .map_max_entries("filter_ipv4", (v4 + 1).max(XDPFILT_DEFAULT_ENTRIES))
            .map_max_entries("filter_ipv6", (v6 + 1).max(XDPFILT_DEFAULT_ENTRIES))
            .load_file(&object)
            .with_context(|| format!("aya loading {}", object.display()))?;
        let program = AyaProgram::load(ebpf, XDPFILT_PROGRAM)?;
        let mut peer = XdpFilterPeer {
            program,
            _bpffs: bpffs,
            object,
        };
        peer.fill(addrs)?;
        Ok(peer)
    }

    /// Writes every address with the "source" flag on every CPU, as
    /// `xdp-filter ip ADDR -m src` does.
    fn fill(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let cpus = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let value = || PerCpuValues::try_from(vec![XDPFILT_FLAG_SRC; cpus]);
        let [v4, v6] = self
            .program
            .ebpf
            .maps_disjoint_mut(["filter_ipv4", "filter_ipv6"]);
        let mut v4: PerCpuHashMap<&mut MapData, u32, u64> =
            PerCpuHashMap::try_from(v4.context("no filter_ipv4 map")?)?;
        let mut v6: PerCpuHashMap<&mut MapData, [u8; 16], u64> =
            PerCpuHashMap::try_from(v6.context("no filter_ipv6 map")?)?;
        for addr in addrs {
            match addr {
                IpAddr::V4(a) => v4.insert(u32::from_ne_bytes(a.octets()), value()?, 0)?,
                IpAddr::V6(a) => v6.insert(a.octets(), value()?, 0)?,
            }
        }
        Ok(())
    }

    /// Packets xdp-filter dropped (its `xdp_stats_map`, summed over CPUs).
    pub fn dropped(&self) -> Result<u64> {
        let stats: PerCpuArray<&MapData, [u64; 2]> = PerCpuArray::try_from(
            self.program
                .ebpf
                .map("xdp_stats_map")
                .context("no xdp_stats_map")?,
        )?;
        // Indexed by XDP action; XDP_DROP is 1; the record is {packets, bytes}.
        Ok(stats.get(&1, 0)?.iter().map(|r| r[0]).sum())
    }
}

/// A bpffs instance of our own on a temporary directory; its pins,
/// the mount and the directory go on drop.
struct PrivateBpffs(PathBuf);

impl PrivateBpffs {
    fn mount() -> Result<PrivateBpffs> {
        let dir = std::env::temp_dir().join(format!(
            "sgbench-bpffs-{}",
            smtpguard_tests::netns::unique_tag()
        ));
        std::fs::create_dir_all(&dir)?;
        let mounted = nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if let Err(e) = mounted {
            let _ = std::fs::remove_dir(&dir);
            bail!("mounting a private bpffs on {}: {e}", dir.display());
        }
        Ok(PrivateBpffs(dir))
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `BPF_MAP_TYPE_PERCPU_HASH`.
pub const MAP_TYPE_PERCPU_HASH: u32 = 5;
/// `BPF_MAP_TYPE_LPM_TRIE`.
pub const MAP_TYPE_LPM_TRIE: u32 = 11;

/// The BPF maps this process holds open: map id → (type, `memlock` bytes),
/// from `/proc/self/fdinfo` (what `bpftool map show` calls `bytes_memlock`).
pub fn open_maps() -> BTreeMap<u32, (u32, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(kind), Some(memlock)) =
            (field("map_id:"), field("map_type:"), field("memlock:"))
        {
            out.insert(id as u32, (kind as u32, memlock));
        }
    }
    out
}

/// Kernel memory of the maps (of type `map_type`, or all) opened since `before`.
pub fn memlock_since(before: &BTreeSet<u32>, map_type: Option<u32>) -> u64 {
    open_maps()
        .into_iter()
        .filter(|(id, (kind, _))| !before.contains(id) && map_type.is_none_or(|t| t == *kind))
        .map(|(_, (_, memlock))| memlock)
        .sum()
}

/// Kernel memory of the maps opened since `before`, by map name (maps of
/// the same name summed).
pub fn memlock_by_name_since(before: &BTreeSet<u32>) -> BTreeMap<String, u64> {
    let names: BTreeMap<u32, String> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter_map(|m| Some((m.id(), m.name_as_str()?.to_string())))
        .collect();
    let mut out = BTreeMap::new();
    for (id, (_, memlock)) in open_maps() {
        if before.contains(&id) {
            continue;
        }
        let name = names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("map {id}"));
        *out.entry(name).or_insert(0) += memlock;
    }
    out
}

/// The ids of the maps open now, to diff against later.
pub fn open_map_ids() -> BTreeSet<u32> {
    open_maps().into_keys().collect()
}

/// Checks a verdict: `XDP_DROP` is 1, `XDP_PASS` 2.
pub fn expect_verdict(who: &str, what: &str, got: u32, want: u32) -> Result<()> {
    if got != want {
        bail!("{who} gave verdict {got} for {what}, expected {want}");
    }
    Ok(())
}
