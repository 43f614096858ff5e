//! Any bytes handed to the embedded store's record readers decode to a record or to an
//! error: never a panic, an abort or an allocation the input did not pay for.
#![no_main]

use chatq::store::embedded::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = record::decode_job(data) {
        // What decodes must encode back to bytes that decode and re-encode identically
        // (compared as bytes: a NaN temperature is not equal to itself). A version-1 record
        // comes back as version 2, so the comparison starts from the first re-encoding.
        let again = record::encode_job(&job).expect("a decoded job encodes");
        let twice = record::decode_job(&again).expect("and decodes again");
        assert_eq!(record::encode_job(&twice).expect("and encodes again"), again);
    }
    let _ = record::decode_interaction(data);
});
