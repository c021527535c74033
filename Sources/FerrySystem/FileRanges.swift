// Moving and dropping byte ranges of files without copying them through
// memory: copy_file_range(2) (kernel 4.5; reflinks or in-kernel copies) and
// hole punching with fallocate(2) (kernel 2.6.38; ext4, xfs, btrfs, tmpfs).
// The image writer uses both, and falls back to reads and writes when a file
// system refuses them. No capability is needed beyond access to the files.
internal import CFerryLinux
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

public enum FileRanges {
    /// Copies up to `count` bytes from `source` at `from` to `target` at `to`
    /// inside the kernel. Returns the bytes copied: fewer than asked, or 0,
    /// when the file system cannot (EXDEV, ENOSYS, EOPNOTSUPP and the like),
    /// in which case the caller copies the rest itself.
    public static func copy(from source: Int32, at from: Int64, to target: Int32, at to: Int64, count: Int) -> Int {
        var done = 0
        while done < count {
            var inOffset = from + Int64(done)
            var outOffset = to + Int64(done)
            let copied = try? checkedCall("copy_file_range", on: "fd \(source)") {
                ferry_copy_file_range(source, &inOffset, target, &outOffset, count - done)
            }
            guard let copied, copied > 0 else { break }
            done += copied
        }
        return done
    }

    /// Turns `length` bytes at `offset` into a hole that reads as zeros,
    /// keeping the file's size. False when the file system cannot.
    public static func punchHole(_ fd: Int32, at offset: Int64, length: Int64) -> Bool {
        (try? checkedCall("fallocate", on: "fd \(fd)") { ferry_punch_hole(fd, offset, length) }) != nil
    }
}
