//! Who holds an interface's XDP hook, for the error when smtpguard cannot
//! attach: the program's id and name and its attach mode, read from the
//! kernel over rtnetlink (`RTM_GETLINK`, the `IFLA_XDP` attributes that
//! `ip -d link` and `bpftool net` show) and `BPF_OBJ_GET_INFO_BY_FD`.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The XDP program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpHolder {
    /// Its program id (`bpftool prog show id N`).
    pub id: u32,
    /// Its name, when the kernel still knows the program.
    pub name: Option<String>,
    /// `native`, `skb`, `hw` or `multiple`.
    pub mode: &'static str,
}

impl std::fmt::Display for XdpHolder {
    /// `program 42 "xdp_dispatcher" in native mode`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "program {}", self.id)?;
        if let Some(name) = &self.name {
            write!(f, " \"{name}\"")?;
        }
        write!(f, " in {} mode", self.mode)
    }
}

/// The XDP program on the interface with index `ifindex`; `None` when
/// there is none or the kernel cannot be asked.
pub fn xdp_holder(ifindex: u32) -> Option<XdpHolder> {
    let (id, mode) = query(ifindex)?;
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    Some(XdpHolder { id, name, mode })
}

/// `(program id, mode)` from `RTM_GETLINK` for one interface.
fn query(ifindex: u32) -> Option<(u32, &'static str)> {
    let mut socket = Socket::new(NETLINK_ROUTE).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&SocketAddr::new(0, 0)).ok()?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
    );
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).ok()?;
    let mut reply = vec![0; 32 * 1024];
    let n = socket.recv(&mut &mut reply[..], 0).ok()?;
    let message: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&reply[..n]).ok()?;
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = message.payload else {
        return None;
    };
    let xdp = link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => Some(xdp),
        _ => None,
    })?;
    let mut id = None;
    let mut mode = None;
    for attr in xdp {
        match attr {
            LinkXdp::ProgId(p) | LinkXdp::DrvProgId(p) | LinkXdp::SkbProgId(p) => {
                id = id.or(Some(p))
            }
            LinkXdp::Attached(a) => {
                mode = match a {
                    XdpAttached::Driver => Some("native"),
                    XdpAttached::SocketBuffer => Some("skb"),
                    XdpAttached::Hardware => Some("hw"),
                    XdpAttached::Multiple => Some("multiple"),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    Some((id.filter(|&p| p != 0)?, mode?))
}
