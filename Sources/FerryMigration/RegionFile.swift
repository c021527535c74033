// One region's file of an image being written (RegionFile), the bitmap of
// the pages it holds (PageBitmap), and the file I/O calls the region files
// make: whole-buffer reads and writes, and the Linux calls Swift's Glibc
// module does not declare.
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// One bit per page, packed in 64-bit words.
struct PageBitmap: Equatable {
    private(set) var words: [UInt64]
    let count: Int

    init(count: Int) {
        self.count = count
        words = Array(repeating: 0, count: (count + 63) / 64)
    }

    subscript(index: Int) -> Bool {
        words[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    /// Sets (or clears) every bit of `range`, a word at a time.
    mutating func set(_ range: Range<Int>, to value: Bool = true) {
        var i = range.lowerBound
        while i < range.upperBound {
            let word = i >> 6
            let first = i & 63
            let last = min(64, first + (range.upperBound - i))
            let mask: UInt64 = last - first == 64 ? ~0 : ((1 << UInt64(last - first)) - 1) << UInt64(first)
            if value { words[word] |= mask } else { words[word] &= ~mask }
            i += last - first
        }
    }

    /// The first index at or after `from` whose bit is `value`, or `count`.
    func first(_ value: Bool, from: Int) -> Int {
        var i = from
        while i < count {
            let word = value ? words[i >> 6] : ~words[i >> 6]
            let rest = word >> UInt64(i & 63)
            if rest != 0 { return min(count, i + rest.trailingZeroBitCount) }
            i = (i | 63) + 1
        }
        return count
    }

    /// The bits set in both.
    func intersection(_ other: PageBitmap) -> PageBitmap {
        precondition(count == other.count, "bitmaps of \(count) and \(other.count) pages")
        var out = self
        for w in words.indices { out.words[w] &= other.words[w] }
        return out
    }

    /// A bitmap of `count` bits whose first bits are this one's.
    func resized(to count: Int) -> PageBitmap {
        var out = PageBitmap(count: count)
        let keep = min(count, self.count)
        for w in 0..<(keep + 63) / 64 { out.words[w] = words[w] }
        if keep % 64 != 0 { out.words[(keep - 1) / 64] &= (1 << UInt64(keep % 64)) - 1 }
        return out
    }
}

/// One region's file.
final class RegionFile {
    var range: AddressRange
    var path: String
    let fd: Int32
    /// Pages stored since the file's region took its shape (or, after
    /// Finalize, since then: see `RegionFiles.sourceFrozen`).
    var held: PageBitmap
    /// BLAKE2b-256 over pages `0..<hashed`, when hashing has begun.
    var hasher = Blake2b256()
    var hashed = 0

    init(range: AddressRange, path: String, fd: Int32) {
        self.range = range
        self.path = path
        self.fd = fd
        held = PageBitmap(count: Int(range.pageCount))
    }

    var pageCount: Int { held.count }

    func offset(of address: UInt64) -> off_t { off_t(address - range.start) }

    /// The checksum of pages `0..<hashed`, hexadecimal; the hash starts again.
    func finishHash() -> String {
        var finished = Blake2b256()
        swap(&finished, &hasher)
        hashed = 0
        return finished.finish().hexString
    }

    /// Starts the checksum again (the region changed shape or a hashed page changed).
    func restartHash() {
        hasher = Blake2b256()
        hashed = 0
    }

    deinit { close(fd) }
}

func writeFully(_ fd: Int32, _ pointer: UnsafeRawPointer, _ count: Int, at offset: off_t, path: String) throws {
    var done = 0
    while done < count {
        do {
            done += try checkedCall("pwrite", on: path, hint: { _ in "is the disk full?" }) {
                pwrite(fd, pointer + done, count - done, offset + off_t(done))
            }
        } catch let error as SystemError {
            throw MigrationError.image("cannot write \(path): \(error)")
        }
    }
}

func readFully(_ fd: Int32, _ pointer: UnsafeMutableRawPointer, _ count: Int, at offset: off_t, path: String) throws {
    var done = 0
    while done < count {
        let n: Int
        do {
            n = try checkedCall("pread", on: path) { pread(fd, pointer + done, count - done, offset + off_t(done)) }
        } catch let error as SystemError {
            throw MigrationError.image("cannot read back \(path): \(error)")
        }
        guard n > 0 else { throw MigrationError.image("cannot read back \(path): short file") }
        done += n
    }
}
