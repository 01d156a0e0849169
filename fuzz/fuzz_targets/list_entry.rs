//! `cargo fuzz run list_entry`: the checks are [`smtpguard_fuzz::list_entry`].
#![no_main]

libfuzzer_sys::fuzz_target!(|input: smtpguard_fuzz::list_entry::Input| {
    smtpguard_fuzz::list_entry::check(&input);
});
