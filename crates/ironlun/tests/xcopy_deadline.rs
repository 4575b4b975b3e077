//! EXTENDED COPY is bounded in time: a copy still running at its time limit ends with COPY
//! ABORTED and its COPY STATUS reads "completed with error", with the bytes it moved.
//!
//! A test file of its own: the daemon takes the limit (`IRONLUN_XCOPY_TIME_LIMIT_MS`) and a
//! pause before each 8 MiB chunk (`IRONLUN_XCOPY_CHUNK_PAUSE_MS`) from its environment, which
//! it inherits from this process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::Daemon;
use ironlun_initiator::xcopy::{parameter_list, split};
use ironlun_initiator::{LoginOptions, SenseKey, Session};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
const CONFIG: &str = r#"
[[target]]
name = "iqn.2026-11.io.ironlun:lab"
[[target.lun]]
id = 0
backstore = "ram"
size = "32MiB"
[[target.lun]]
id = 1
backstore = "ram"
size = "32MiB"
"#;

#[tokio::test]
async fn a_copy_past_its_time_limit_is_copy_aborted() {
    std::env::set_var("IRONLUN_XCOPY_CHUNK_PAUSE_MS", "100");
    std::env::set_var("IRONLUN_XCOPY_TIME_LIMIT_MS", "250");
    let d = Daemon::start_with_config(CONFIG);
    let s = Session::connect(
        d.addr,
        LoginOptions::new("iqn.2026-11.io.test:slow", Some(TARGET.into())),
    )
    .await
    .unwrap();
    let lun = |n: u64| n << 48;
    for n in 0..2 {
        while s.test_unit_ready(lun(n)).await.unwrap().status != 0 {}
    }
    let naa0 = s.lu_naa(lun(0)).await.unwrap().unwrap();
    let naa1 = s.lu_naa(lun(1)).await.unwrap().unwrap();
    // 32 MiB: four chunks, 100 ms pause before each; the limit falls after the second.
    let list = parameter_list(3, &[naa0, naa1], 512, &split(0, 1, 0, 0, 64 * 1024));
    let r = s.extended_copy(lun(1), list).await.unwrap();
    assert_eq!(r.status, 2, "CHECK CONDITION");
    let k = SenseKey::parse(&r.sense).unwrap();
    assert_eq!((k.key, k.asc, k.ascq), (0x0A, 0x00, 0x00), "COPY ABORTED");
    let st = s.receive_copy_results(lun(1), 0, 3).await.unwrap();
    assert_eq!(st.status, 0);
    assert_eq!(st.data[4] & 0x7f, 0x02, "completed with error");
    let moved = u64::from(u32::from_be_bytes(st.data[8..12].try_into().unwrap()))
        << (10 * u32::from(st.data[7]));
    assert!(
        moved > 0 && moved < 32 << 20,
        "a part of the copy was done: {moved} bytes"
    );
}
