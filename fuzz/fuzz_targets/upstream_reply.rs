//! `cargo fuzz run upstream_reply`: the checks are [`smtpguard_fuzz::upstream_reply`].
#![no_main]

libfuzzer_sys::fuzz_target!(|input: smtpguard_fuzz::upstream_reply::Input| {
    smtpguard_fuzz::upstream_reply::check(&input);
});
