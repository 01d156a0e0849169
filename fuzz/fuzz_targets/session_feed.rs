//! `cargo fuzz run session_feed`: the checks are [`smtpguard_fuzz::session_feed`].
#![no_main]

libfuzzer_sys::fuzz_target!(|input: smtpguard_fuzz::session_feed::Input| {
    smtpguard_fuzz::session_feed::check(&input);
});
