//! The compiled IPv4 lookup of the XDP program (layout in
//! `smtpguard_common::ipv4_table`): [`compile`] turns the merged rule set
//! into the table, sans IO; [`writer`] puts it into the maps, whole
//! generations through `mmap` and single prefixes copy-on-write.

pub mod compile;
pub mod writer;
