import Testing
import FerryTestSupport
import Glibc
@testable import FerrySystem

/// A page-aligned buffer owned by one test.
private final class Buffer {
    let bytes: UnsafeMutableRawBufferPointer
    init(_ count: Int) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0xAA)
    }
    deinit { bytes.deallocate() }
    func word(_ offset: Int) -> UInt64 { bytes.load(fromByteOffset: offset, as: UInt64.self) }
}

@Suite struct PageReaderTests {
    @Test func readsExactlyWhatTheChildWrote() throws {
        let seed: UInt64 = 3
        let writer = try Memwriter(["--mib", "4", "--shared", "1", "--memfd", "1", "--pattern", "--seed", "\(seed)", "--no-write"])
        defer { writer.stop() }
        let reader = try PageReader(pid: writer.pid)
        let key = Memwriter.patternKey(seed: seed)
        for name in ["main", "shared", "memfd"] {
            let range = try #require(writer.regions[name])
            let buffer = Buffer(Int(range.length))
            #expect(try reader.read([range], into: buffer.bytes) == Int(range.length))
            var mismatches = 0
            for offset in stride(from: 0, to: Int(range.length), by: 8) where buffer.word(offset) != UInt64(offset) ^ key {
                mismatches += 1
            }
            #expect(mismatches == 0, "\(name): \(mismatches) words differ from the pattern")
        }
    }

    /// Reading a process must not break the copy-on-write sharing it has
    /// with a child it forked (issue 15): a pinning read unshares each page
    /// it reads, and the memory of both grows by what they shared.
    @Test func readingAForkedParentKeepsWhatItSharesWithItsChild() throws {
        let script = """
            import os, sys, time
            b = bytearray(b'\\x5a') * (64 << 20)
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            print(child, flush=True)
            time.sleep(120)
            """
        let parent = try ChildProcess("/usr/bin/python3", ["-c", script])
        defer { parent.stop() }
        guard let child = Int32(try parent.readLine()) else { throw TestFailure("the script printed no child pid") }
        defer { kill(child, SIGKILL) }
        func sharedKiB(_ pid: Int32) throws -> Int {
            let smaps = try String(contentsOfFile: "/proc/\(pid)/smaps_rollup", encoding: .utf8)
            return smaps.split(separator: "\n").filter { $0.hasPrefix("Shared_") }
                .reduce(0) { $0 + (Int($1.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0) }
        }
        let before = try sharedKiB(child)
        #expect(before >= 64 << 10, "the child shares \(before) KiB before the read")
        let reader = try PageReader(pid: parent.pid)
        let regions = try ProcessMaps.read(pid: parent.pid).filter { $0.kind == .migrate }
        let total = regions.reduce(0) { $0 + Int($1.range.length) }
        let buffer = Buffer(total)
        _ = try reader.readReporting(regions.map(\.range), into: buffer.bytes)
        let after = try sharedKiB(child)
        #expect(after >= before - 1024, "reading the parent unshared \((before - after) >> 10) MiB of its child's memory")
    }

    @Test func scatteredPagesInManyBatches() throws {
        // 3000 single pages in shuffled order: three process_vm_readv calls of 1024 iovecs.
        let seed: UInt64 = 11
        let writer = try Memwriter(["--mib", "16", "--pattern", "--seed", "\(seed)", "--no-write"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        var pages = Array(0..<Int(main.pageCount)).shuffled().prefix(3000)
        pages.shuffle()
        let ranges = pages.map { AddressRange(start: main.start + UInt64($0) * 4096, end: main.start + UInt64($0 + 1) * 4096) }
        let buffer = Buffer(ranges.count * 4096)
        let result = try PageReader(pid: writer.pid).readReporting(ranges, into: buffer.bytes)
        #expect(result == PageReadResult(bytes: 3000 * 4096, vanished: []))
        let key = Memwriter.patternKey(seed: seed)
        for (slot, page) in pages.enumerated() {
            for word in [0, 1, 255, 511] {
                let expected = UInt64(page * 4096 + word * 8) ^ key
                if buffer.word(slot * 4096 + word * 8) != expected {
                    Issue.record("slot \(slot) (page \(page)) word \(word) differs")
                    return
                }
            }
        }
    }

    // The vanished-page tests unmap memory in a memwriter child, not in this
    // process: here, other tests running at the same time could map
    // something new into the hole.

    @Test func vanishedPagesAreReportedNotZeroed() throws {
        let writer = try Memwriter(["--mib", "1", "--pattern", "--no-write"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        writer.send("unmap 3 2")
        #expect(try writer.expect("unmap") == "unmapped 3 2")
        let base = main.start
        let reader = try PageReader(pid: writer.pid)
        let buffer = Buffer(8 * 4096)
        let all = AddressRange(start: base, end: base + 8 * 4096)
        let result = try reader.readReporting([all], into: buffer.bytes)
        #expect(result.vanished == [AddressRange(start: base + 3 * 4096, end: base + 5 * 4096)])
        let key = Memwriter.patternKey(seed: 1)
        for page in [0, 1, 2, 5, 6, 7] { #expect(buffer.word(page * 4096 + 64) == UInt64(page * 4096 + 64) ^ key) }
        #expect(buffer.word(3 * 4096) == 0 && buffer.word(5 * 4096 - 8) == 0)

        // The same as eight adjacent one-page ranges (merged into one iovec by the reader).
        let perPage = (0..<8).map { AddressRange(start: base + UInt64($0) * 4096, end: base + UInt64($0 + 1) * 4096) }
        let again = Buffer(8 * 4096)
        #expect(try reader.readReporting(perPage, into: again.bytes) == result)
        #expect(memcmp(again.bytes.baseAddress!, buffer.bytes.baseAddress!, 8 * 4096) == 0)

        #expect {
            try reader.read([all], into: buffer.bytes)
        } throws: { error in
            "\(error)" == "cannot read 1 range(s) of pid \(writer.pid): no longer mapped (\(AddressRange(start: base + 3 * 4096, end: base + 5 * 4096))); re-read the layout"
        }
    }

    @Test func aLargeUnmappedGapIsSettledAtOnce() throws {
        // 64 MiB, all but the first and last page unmapped: one vanished
        // range, found without two failing calls per page.
        let writer = try Memwriter(["--mib", "64", "--pattern", "--no-write"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        let pages = Int(main.pageCount)
        writer.send("unmap 1 \(pages - 2)")
        #expect(try writer.expect("unmap") == "unmapped 1 \(pages - 2)")
        let buffer = Buffer(Int(main.length))
        let start = Memwriter.now()
        let result = try PageReader(pid: writer.pid).readReporting([main], into: buffer.bytes)
        let elapsed = Memwriter.now() - start
        #expect(result.vanished == [AddressRange(start: main.start + 4096, end: main.end - 4096)])
        let key = Memwriter.patternKey(seed: 1)
        #expect(buffer.word(8) == 8 ^ key)
        #expect(buffer.word(Int(main.length) - 4096) == UInt64(Int(main.length) - 4096) ^ key)
        #expect(buffer.word(4096) == 0 && buffer.word(Int(main.length) - 8192) == 0)
        #expect(elapsed < 2, "settling \(pages - 2) unmapped pages took \(elapsed) s")
    }

    @Test func protNonePagesAreReadThroughProcMem() throws {
        let raw = mmap(nil, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(raw, 4 * 4096) }
        for page in 0..<4 { raw.storeBytes(of: UInt64(0xBEEF00 + page), toByteOffset: page * 4096 + 16, as: UInt64.self) }
        mprotect(raw + 4096, 4096, PROT_NONE)
        let base = UInt64(UInt(bitPattern: raw))
        let buffer = Buffer(4 * 4096)
        let result = try PageReader(pid: getpid()).readReporting([AddressRange(start: base, end: base + 4 * 4096)], into: buffer.bytes)
        #expect(result.vanished.isEmpty)
        for page in 0..<4 { #expect(buffer.word(page * 4096 + 16) == UInt64(0xBEEF00 + page)) }
    }

    @Test func errorsNameThePid() throws {
        #expect {
            _ = try PageReader(pid: Int32.max)
        } throws: { error in
            "\(error)" == "cannot read the memory of pid 2147483647: no such process (it may have exited)"
        }
        let reader = try PageReader(pid: getpid())
        let small = Buffer(4096)
        #expect {
            try reader.read([AddressRange(start: 0x10000, end: 0x12000)], into: small.bytes)
        } throws: { error in
            "\(error)" == "cannot read pages: the buffer holds 4096 bytes but the ranges need 8192 (pass a larger buffer or fewer ranges)"
        }
    }

    @Test func readerOfAnExitedProcessSaysSo() throws {
        let writer = try Memwriter(["--mib", "1", "--no-write"])
        let main = try #require(writer.regions["main"])
        let reader = try PageReader(pid: writer.pid)
        writer.stop()
        let buffer = Buffer(4096)
        #expect {
            try reader.read([AddressRange(start: main.start, end: main.start + 4096)], into: buffer.bytes)
        } throws: { error in
            "\(error)".contains("pid \(writer.pid)")
        }
    }

    @Test func emptyAndZeroLengthRequests() throws {
        let reader = try PageReader(pid: getpid())
        let buffer = Buffer(4096)
        #expect(try reader.read([], into: buffer.bytes) == 0)
        let value = UnsafeMutablePointer<UInt64>.allocate(capacity: 512)
        defer { value.deallocate() }
        value.initialize(repeating: 0x55, count: 512)
        let address = UInt64(UInt(bitPattern: value))
        let ranges = [AddressRange(start: address, end: address), AddressRange(start: address, end: address + 8),
                      AddressRange(start: address + 8, end: address + 8)]
        #expect(try reader.read(ranges, into: buffer.bytes) == 8)
        #expect(buffer.word(0) == 0x55)
    }
}
