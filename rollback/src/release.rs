//! Kernel release strings (`uname -r`) and their ordering for the downgrade checks.
//!
//! A release is `MAJOR.MINOR[.PATCH][SUFFIX]`, for example `7.2.13-mkA` or
//! `6.8.0-45-generic`; a missing patch level counts as 0. Only the numeric triple is
//! ordered: `7.2.13-mkA` and `7.2.13-mkB` are *equal* for downgrade purposes (neither is a
//! downgrade of the other), because local version suffixes carry no order the agent could
//! know. Installing a different build of the same version is therefore always allowed.

use std::cmp::Ordering;
use std::fmt;

/// Why a release string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{release:?} is not a kernel release of the form MAJOR.MINOR[.PATCH][-SUFFIX]: {reason}")]
pub struct ReleaseError {
    /// The string given.
    pub release: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A parsed kernel release.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Release {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level (0 when absent).
    pub patch: u32,
    /// Everything after the numbers (`-mkA`, `-45-generic`, `+`), possibly empty.
    pub suffix: String,
}

impl Release {
    /// Parses a release string.
    pub fn parse(s: &str) -> Result<Self, ReleaseError> {
        let err = |reason| ReleaseError {
            release: s.chars().take(80).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.len() > 64 {
            return Err(err("longer than 64 bytes"));
        }
        if !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err("contains whitespace or non-ASCII characters"));
        }
        let mut rest = s;
        let mut nums = [0u32; 3];
        let mut count = 0;
        while count < 3 {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                if count < 2 {
                    return Err(err("expected a number"));
                }
                break;
            }
            nums[count] = rest[..digits]
                .parse()
                .map_err(|_| err("version number out of range"))?;
            count += 1;
            rest = &rest[digits..];
            if count < 3
                && rest.starts_with('.')
                && rest[1..].starts_with(|c: char| c.is_ascii_digit())
            {
                rest = &rest[1..];
            } else {
                if count < 2 {
                    return Err(err("expected MAJOR.MINOR"));
                }
                break;
            }
        }
        Ok(Release {
            major: nums[0],
            minor: nums[1],
            patch: nums[2],
            suffix: rest.to_owned(),
        })
    }

    /// The numeric part, which is all that [`Release::cmp_version`] orders.
    pub fn numeric(&self) -> (u32, u32, u32) {
        (self.major, self.minor, self.patch)
    }

    /// Orders by the numeric version only (suffixes are ignored, see the module docs).
    pub fn cmp_version(&self, other: &Release) -> Ordering {
        self.numeric().cmp(&other.numeric())
    }

    /// Whether this release is numerically older than `other`.
    pub fn is_below(&self, other: &Release) -> bool {
        self.cmp_version(other) == Ordering::Less
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}{}",
            self.major, self.minor, self.patch, self.suffix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Release {
        Release::parse(s).unwrap()
    }

    #[test]
    fn parses_common_forms() {
        assert_eq!(r("7.2.13-mkA").numeric(), (7, 2, 13));
        assert_eq!(r("7.2.13-mkA").suffix, "-mkA");
        assert_eq!(r("6.8.0-45-generic").numeric(), (6, 8, 0));
        assert_eq!(r("6.9").numeric(), (6, 9, 0));
        assert_eq!(r("6.9-rc3").suffix, "-rc3");
        assert_eq!(r("5.15.0+").suffix, "+");
        assert_eq!(r("1.2.3.4").suffix, ".4");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "7",
            "x.y",
            "7.",
            "7.x",
            "7.2 13",
            "99999999999.1",
            "ü.1",
        ] {
            assert!(Release::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ordering_is_numeric_and_ignores_suffix() {
        assert!(r("7.2.9").is_below(&r("7.2.13")));
        assert!(r("6.99.0").is_below(&r("7.0")));
        assert!(!r("7.2.13-mkA").is_below(&r("7.2.13-mkB")));
        assert!(!r("7.2.13-mkB").is_below(&r("7.2.13-mkA")));
        assert_eq!(r("7.2.13-mkA").cmp_version(&r("7.2.13")), Ordering::Equal);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Release::parse(&s);
        }

        #[test]
        fn display_roundtrips(a in 0u32..1000, b in 0u32..1000, c in 0u32..1000, suf in "(-[a-z0-9]{1,8})?") {
            let s = format!("{a}.{b}.{c}{suf}");
            let rel = Release::parse(&s).unwrap();
            proptest::prop_assert_eq!(rel.to_string(), s);
        }
    }
}
