import Testing
import FerryTestSupport
import Glibc
@testable import FerrySystem

private func anon(_ start: UInt64, _ end: UInt64, _ perms: String = "rw-p", name: String = "") -> Region {
    Region(range: AddressRange(start: start, end: end), permissions: perms, offset: 0, device: "00:00",
           inode: 0, name: name, kind: ProcessMaps.classify(permissions: perms, name: name, inode: 0))
}

private func file(_ start: UInt64, _ end: UInt64, _ perms: String, offset: UInt64, inode: UInt64, name: String) -> Region {
    Region(range: AddressRange(start: start, end: end), permissions: perms, offset: offset, device: "00:01",
           inode: inode, name: name, kind: ProcessMaps.classify(permissions: perms, name: name, inode: inode))
}

private func r(_ start: UInt64, _ end: UInt64) -> AddressRange { AddressRange(start: start, end: end) }

@Suite struct LayoutDiffTests {
    @Test func sameLayoutIsNoChange() {
        let layout = [anon(0x1000, 0x5000), anon(0x8000, 0x9000, name: "[heap]")]
        let change = LayoutChange.diff(old: layout, new: layout)
        #expect(change.isEmpty && change.added.isEmpty && change.removed.isEmpty)
        #expect(change.regions == layout)
    }

    @Test func mprotectSplitAndMergeAreNoChange() {
        let old = [anon(0x10000, 0x20000)]
        let split = [anon(0x10000, 0x14000), anon(0x14000, 0x15000, "r--p"), anon(0x15000, 0x20000)]
        #expect(LayoutChange.diff(old: old, new: split).isEmpty)
        #expect(LayoutChange.diff(old: split, new: old).isEmpty)
        // A split of a private file mapping keeps its offsets consistent.
        let data = [file(0x40000, 0x44000, "rw-p", offset: 0x3000, inode: 9, name: "/lib/x.so")]
        let dataSplit = [file(0x40000, 0x41000, "rw-p", offset: 0x3000, inode: 9, name: "/lib/x.so"),
                         file(0x41000, 0x44000, "rw-p", offset: 0x4000, inode: 9, name: "/lib/x.so")]
        #expect(LayoutChange.diff(old: data, new: dataSplit).isEmpty)
    }

    @Test func newGrownRemovedAndShrunk() {
        let old = [anon(0x10000, 0x20000, name: "[heap]"), anon(0x40000, 0x50000), anon(0x60000, 0x70000),
                   anon(0x7ff000, 0x800000, name: "[stack]")]
        let new = [anon(0x10000, 0x28000, name: "[heap]"),     // heap grew by 0x8000
                   anon(0x30000, 0x38000),                      // new mapping
                   anon(0x60000, 0x68000),                      // shrunk (munmap of the top half)
                   anon(0x7fd000, 0x800000, name: "[stack]")]   // stack grew down; 0x40000 removed
        let change = LayoutChange.diff(old: old, new: new)
        #expect(change.newlyDirty == [r(0x20000, 0x28000), r(0x30000, 0x38000), r(0x7fd000, 0x7ff000)])
        #expect(change.unmapped == [r(0x40000, 0x50000), r(0x68000, 0x70000)])
        #expect(change.added.map(\.range) == [r(0x30000, 0x38000)])
        #expect(change.grown.map(\.name) == ["[heap]", "[stack]"])
        #expect(change.removed.map(\.range) == [r(0x40000, 0x50000)])
        #expect(change.shrunk.map(\.range) == [r(0x60000, 0x70000)])
        #expect(change.newlyDirtyPages == 8 + 8 + 2)
    }

    @Test func replacedBackingAtTheSameAddressIsNew() {
        let old = [file(0x10000, 0x20000, "rw-s", offset: 0, inode: 100, name: "/memfd:a (deleted)")]
        let new = [file(0x10000, 0x20000, "rw-s", offset: 0, inode: 101, name: "/memfd:a (deleted)")]
        let change = LayoutChange.diff(old: old, new: new)
        #expect(change.newlyDirty == [r(0x10000, 0x20000)])
        #expect(change.unmapped == [r(0x10000, 0x20000)])
        #expect(change.added.count == 1 && change.removed.count == 1)
    }

    @Test func losingAccessOrBecomingMigratableCounts() {
        let old = [anon(0x10000, 0x20000), file(0x30000, 0x31000, "r--p", offset: 0, inode: 5, name: "/bin/x")]
        let new = [anon(0x10000, 0x18000), anon(0x18000, 0x20000, "---p"),
                   file(0x30000, 0x31000, "rw-p", offset: 0, inode: 5, name: "/bin/x")]
        let change = LayoutChange.diff(old: old, new: new)
        #expect(change.unmapped == [r(0x18000, 0x20000)])
        #expect(change.newlyDirty == [r(0x30000, 0x31000)])
    }

    /// Real mprotect in this test process, read back from /proc/self/maps.
    /// Only protections change (no holes that a concurrent test's mmap could
    /// fill), and only our own addresses are checked.
    @Test func followsRealMprotectSplits() throws {
        let pid = getpid()
        let size = 64 * 4096
        // SAFETY: test-owned anonymous mapping, unmapped before return.
        let raw = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(raw, size) }
        let base = UInt64(UInt(bitPattern: raw))
        let mine = r(base, base + UInt64(size))
        func ours(_ ranges: [AddressRange]) -> [AddressRange] {
            ranges.compactMap { x in
                let s = max(x.start, mine.start), e = min(x.end, mine.end)
                return s < e ? r(s, e) : nil
            }
        }
        // The last 16 pages start inaccessible (reserved, not migrated).
        mprotect(raw + 48 * 4096, 16 * 4096, PROT_NONE)
        let before = try ProcessMaps.read(pid: pid)

        // Split by mprotect, still readable: no change.
        mprotect(raw + 8 * 4096, 4096, PROT_READ)
        let split = try ProcessMaps.read(pid: pid)
        #expect(ours(LayoutChange.diff(old: before, new: split).newlyDirty).isEmpty)
        #expect(ours(LayoutChange.diff(old: before, new: split).unmapped).isEmpty)

        // Two pages become PROT_NONE (no longer migrated); the reserved tail becomes usable (new).
        mprotect(raw + 16 * 4096, 2 * 4096, PROT_NONE)
        mprotect(raw + 48 * 4096, 16 * 4096, PROT_READ | PROT_WRITE)
        let after = try ProcessMaps.read(pid: pid)
        let change = LayoutChange.diff(old: split, new: after)
        #expect(ours(change.unmapped) == [r(base + 16 * 4096, base + 18 * 4096)])
        #expect(ours(change.newlyDirty) == [r(base + 48 * 4096, base + 64 * 4096)])
    }

    /// munmap in a memwriter child: a hole in its main region is reported unmapped.
    @Test func followsRealMunmapInAChild() throws {
        let writer = try Memwriter(["--mib", "1", "--no-write"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        let before = try ProcessMaps.read(pid: writer.pid)
        writer.send("unmap 10 6")
        #expect(try writer.expect("unmap") == "unmapped 10 6")
        let after = try ProcessMaps.read(pid: writer.pid)
        let change = LayoutChange.diff(old: before, new: after)
        #expect(change.unmapped == [r(main.start + 10 * 4096, main.start + 16 * 4096)])
        #expect(change.newlyDirty.isEmpty)
        #expect(change.shrunk.contains { $0.start <= main.start && main.end <= $0.end })
    }

    @Test func seesChurnOfARealProcess() throws {
        let writer = try Memwriter(["--mib", "1", "--churn", "--heap-grow", "--rate", "100"])
        defer { writer.stop() }
        let first = try ProcessMaps.read(pid: writer.pid)
        usleep(120_000)
        let second = try ProcessMaps.read(pid: writer.pid)
        let change = LayoutChange.diff(old: first, new: second)
        #expect(!change.newlyDirty.isEmpty)
        // Every newly dirty byte lies inside a migrate region of the new layout.
        for range in change.newlyDirty {
            let covered = second.filter { $0.kind == .migrate && $0.start < range.end && range.start < $0.end }
                .reduce(UInt64(0)) { $0 + min($1.end, range.end) - max($1.start, range.start) }
            #expect(covered == range.length, "\(range) not covered by migrate regions")
        }
        // And nothing unmapped is still covered by the same migrate memory.
        #expect(LayoutChange.diff(old: second, new: second).isEmpty)
    }
}
