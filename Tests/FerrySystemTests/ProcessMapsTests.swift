import Testing
import Foundation
import FerryTestSupport
import Glibc
@testable import FerrySystem

@Suite struct ProcessMapsTests {
    static let sample = """
    55cc8ce8a000-55cc8ce8c000 r--p 00000000 fe:00 253911                     /usr/bin/cat
    55cc8ce8c000-55cc8ce91000 r-xp 00002000 fe:00 253911                     /usr/bin/cat
    55cc8ce95000-55cc8ce96000 rw-p 0000a000 fe:00 253911                     /usr/bin/cat
    55ccb766b000-55ccb768c000 rw-p 00000000 00:00 0                          [heap]
    7f7d88e30000-7f7d88e52000 rw-p 00000000 00:00 0 
    7f7d88e52000-7f7d88ea9000 r--p 00000000 fe:00 323409                     /opt/my app/data file.bin
    7f7d88ea9000-7f7d88eaa000 rw-s 00000000 00:01 1025                       /dev/zero (deleted)
    7f7d88eaa000-7f7d88eab000 rw-s 00000000 00:01 1026                       /memfd:my buffer (deleted)
    7f7d88eab000-7f7d88eac000 rw-s 00000000 00:01 32769                      /SYSV00000000 (deleted)
    7f7d88eac000-7f7d88ead000 rw-p 00000000 00:00 0                          [anon:arena]
    7f7d88ead000-7f7d88eae000 rw-s 00000000 00:06 512                        /dev/dri/renderD128
    7f7d88eae000-7f7d88eaf000 rw-p 00001000 fe:00 99                         /tmp/gone.so (deleted)
    7f7d88eaf000-7f7d88eb0000 ---p 00000000 00:00 0 
    7f7d88eb0000-7f7d88eb1000 rw-s 00000000 fe:00 77                         /var/lib/data.db
    7f7d88eb1000-7f7d88eb2000 rw-s 00000000 00:1a 5                          /dev/shm/ring
    7f7d88eb2000-7f7d88eb3000 r--p 00000000 00:00 0 
    7f7d890a2000-7f7d890a6000 r--p 00000000 00:00 0                          [vvar]
    7f7d890a6000-7f7d890a8000 r--p 00000000 00:00 0                          [vvar_vclock]
    7f7d890a8000-7f7d890aa000 r-xp 00000000 00:00 0                          [vdso]
    7f7d890b0000-7f7d890b1000 rw-p 00000000 00:0f 2053                       anon_inode:[perf_event]
    7f7d890b1000-7f7d890b2000 rw-s 00000000 00:10 4121                       /[aio] (deleted)
    7ffcfbfc4000-7ffcfbfe5000 rw-p 00000000 00:00 0                          [stack]
    ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]

    """

    @Test func parsesAndClassifiesEveryKindOfLine() throws {
        let regions = try ProcessMaps.parse(Array(Self.sample.utf8), pid: 42)
        #expect(regions.count == 23)
        let expected: [(String, RegionKind)] = [
            ("/usr/bin/cat", .recordOnly), ("/usr/bin/cat", .recordOnly), ("/usr/bin/cat", .migrate),
            ("[heap]", .migrate), ("", .migrate), ("/opt/my app/data file.bin", .recordOnly),
            ("/dev/zero (deleted)", .migrate), ("/memfd:my buffer (deleted)", .migrate),
            ("/SYSV00000000 (deleted)", .migrate), ("[anon:arena]", .migrate),
            ("/dev/dri/renderD128", .skip), ("/tmp/gone.so (deleted)", .migrate), ("", .recordOnly),
            ("/var/lib/data.db", .recordOnly), ("/dev/shm/ring", .migrate), ("", .migrate),
            ("[vvar]", .skip), ("[vvar_vclock]", .skip), ("[vdso]", .skip), ("anon_inode:[perf_event]", .skip),
            ("/[aio] (deleted)", .skip), ("[stack]", .migrate), ("[vsyscall]", .skip),
        ]
        for (region, (name, kind)) in zip(regions, expected) {
            #expect(region.name == name)
            #expect(region.kind == kind, "\(region.name) \(region.permissions)")
        }
        let text = regions[1]
        #expect(text.range == AddressRange(start: 0x55cc8ce8c000, end: 0x55cc8ce91000))
        #expect(text.permissions == "r-xp")
        #expect(text.offset == 0x2000)
        #expect(text.device == "fe:00")
        #expect(text.inode == 253911)
        #expect(regions[7].path == "/memfd:my buffer")
        #expect(regions[7].isDeleted && regions[7].isShared)
        #expect(regions[6].isAnonymous)
        #expect(!regions[0].isAnonymous)
        #expect(regions[22].start == 0xffffffffff600000)
    }

    /// A real AIO ring (io_setup) and a writable shared file mapping: the
    /// ring is the kernel's (skip), the file mapping's contents are the
    /// file's (record), as Protocols/image.md says.
    @Test func anAIORingIsSkippedAndASharedFileMappingRecorded() throws {
        let file = "/tmp/ferry-maps-shared-\(getpid())"
        defer { unlink(file) }
        let script = """
            import ctypes, mmap, os, sys, time
            libc = ctypes.CDLL(None, use_errno=True)
            ctx = ctypes.c_ulong(0)
            if libc.syscall(206, 8, ctypes.byref(ctx)) != 0:
                print("io_setup failed", ctypes.get_errno(), flush=True); sys.exit(1)
            fd = os.open("\(file)", os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 1 << 16)
            m = mmap.mmap(fd, 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0:5] = b"hello"
            print("ready", flush=True)
            time.sleep(60)
            """
        let child = try ChildProcess("/usr/bin/python3", ["-c", script])
        defer { child.stop() }
        #expect(try child.readLine() == "ready")
        let regions = try ProcessMaps.read(pid: child.pid)
        let ring = try #require(regions.first { $0.name.hasPrefix("/[aio]") })
        #expect(ring.kind == .skip)
        let mapped = try #require(regions.first { $0.name == file && $0.permissions == "rw-s" })
        #expect(mapped.kind == .recordOnly)
    }

    @Test func malformedLineNamesPidAndLine() {
        let text = Array("00400000-00452000 r-xp 00000000 08:02\n".utf8)
        #expect {
            try ProcessMaps.parse(text, pid: 77)
        } throws: { error in
            "\(error)" == "cannot parse a line of /proc/77/maps: \"00400000-00452000 r-xp 00000000 08:02\" (unknown kernel format; please report it)"
        }
    }

    @Test func missingProcessIsNamed() {
        #expect {
            try ProcessMaps.read(pid: Int32.max)
        } throws: { error in
            "\(error)".hasPrefix("cannot read the memory map of pid 2147483647: no such process")
        }
    }

    @Test func classifiesARealProcess() throws {
        let writer = try Memwriter(["--mib", "2", "--shared", "1", "--memfd", "1", "--no-write"])
        defer { writer.stop() }
        let regions = try ProcessMaps.read(pid: writer.pid)
        func region(containing range: AddressRange) -> Region? {
            regions.first { $0.start <= range.start && range.end <= $0.end }
        }
        let mainRange = try #require(writer.regions["main"])
        let sharedRange = try #require(writer.regions["shared"])
        let memfdRange = try #require(writer.regions["memfd"])
        let main = try #require(region(containing: mainRange))
        #expect(main.kind == .migrate && main.name.isEmpty && main.permissions == "rw-p")
        let shared = try #require(region(containing: sharedRange))
        #expect(shared.kind == .migrate && shared.isShared && shared.path == "/dev/zero")
        let memfd = try #require(region(containing: memfdRange))
        #expect(memfd.kind == .migrate && memfd.path == "/memfd:memwriter")
        // memwriter's own text and read-only data: recorded, not copied.
        let own = regions.filter { $0.path.hasSuffix("/memwriter") }
        #expect(own.contains { $0.permissions == "r-xp" && $0.kind == .recordOnly })
        #expect(own.contains { $0.permissions == "r--p" && $0.kind == .recordOnly })
        #expect(own.contains { $0.permissions == "rw-p" && $0.kind == .migrate })
        #expect(regions.contains { $0.name == "[stack]" && $0.kind == .migrate })
        #expect(regions.contains { $0.name == "[vdso]" && $0.kind == .skip })
        #expect(regions.contains { $0.name == "[vvar]" && $0.kind == .skip })
        // Sorted, non-overlapping.
        for (a, b) in zip(regions, regions.dropFirst()) { #expect(a.end <= b.start) }
    }

    @Test func readsMapsLargerThanTheFirstBuffer() throws {
        // 6000 one-page mappings (alternate protections keep them from
        // merging): well over the 256 KiB read on the first try.
        let pages = 6000
        let raw = mmap(nil, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(raw, pages * 4096) }
        for page in stride(from: 0, to: pages, by: 2) { mprotect(raw + page * 4096, 4096, PROT_READ) }
        let base = UInt64(UInt(bitPattern: raw))
        let end = base + UInt64(pages * 4096)
        let regions = try ProcessMaps.read(pid: getpid())
        // Overlapping rather than inside: other tests of this process map
        // memory meanwhile, and a neighbour may merge with our first or last page.
        let ours = regions.filter { $0.end > base && $0.start < end }
        #expect(ours.count == pages)
        #expect(ours.allSatisfy { $0.kind == .migrate || $0.kind == .recordOnly })
        #expect(ours.filter { $0.start >= base && $0.end <= end }.allSatisfy { $0.range.length == 4096 })
    }

    /// A process whose heap break moves in a loop, with a thread mapping
    /// and unmapping beside it: the kernel (6.18) tears about 1 walk of
    /// /proc/PID/maps in 100, showing the heap twice. Every layout read
    /// must still be sorted and without overlaps (the wire refuses others:
    /// a hub once lost its seeder over one).
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/gcc"), "needs gcc"))
    func aLayoutReadWhileTheHeapMovesIsConsistent() throws {
        let source = """
            #include <pthread.h>
            #include <stdio.h>
            #include <sys/mman.h>
            #include <unistd.h>
            static void *churn(void *unused) {
                for (;;) { void *p = mmap(0, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); munmap(p, 1 << 16); }
                return unused;
            }
            int main(void) {
                pthread_t thread;
                pthread_create(&thread, 0, churn, 0);
                printf("ready\\n");
                fflush(stdout);
                for (;;) { sbrk(32768); ((char *)sbrk(0))[-1] = 1; sbrk(-32768); }
            }
            """
        let directory = "/tmp/ferry-maps-\(getpid())-\(Int.random(in: 0..<1_000_000))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try source.write(toFile: directory + "/brk.c", atomically: true, encoding: .utf8)
        let gcc = try ChildProcess("/usr/bin/gcc", ["-O1", "-pthread", "-o", directory + "/brk", directory + "/brk.c"])
        #expect(gcc.waitForExit() == 0)
        let child = try ChildProcess(directory + "/brk", [])
        defer { child.stop() }
        #expect(try child.readLine() == "ready")
        var torn = 0
        for _ in 0..<3000 {
            let regions = try ProcessMaps.read(pid: child.pid)
            if !ProcessMaps.isConsistent(regions) { torn += 1 }
        }
        #expect(torn == 0, "\(torn) of 3000 layouts overlapped")
    }

    /// What a torn walk becomes when no walk was whole: sorted, the copy
    /// inside another dropped, the overlapping end kept, nothing lost.
    @Test func aTornWalkIsMadeConsistent() throws {
        let torn = try ProcessMaps.parse(Array("""
            1000-5000 rw-p 00000000 00:00 0                          [heap]
            1000-3000 rw-p 00000000 00:00 0                          [heap]
            0-1000 r--p 00000000 fe:00 7                             /bin/x
            4000-8000 r--p 00002000 fe:00 8                          /lib/y
            9000-a000 rw-p 00000000 00:00 0
            """.utf8), pid: 1)
        #expect(!ProcessMaps.isConsistent(torn))
        let fixed = ProcessMaps.consistent(torn)
        #expect(ProcessMaps.isConsistent(fixed))
        #expect(fixed.map(\.start) == [0, 0x1000, 0x5000, 0x9000])
        #expect(fixed.map(\.end) == [0x1000, 0x5000, 0x8000, 0xa000])
        #expect(fixed[2].name == "/lib/y" && fixed[2].offset == 0x3000)
    }

    @Test func readingIsFast() throws {
        // A few hundred mappings: well under a millisecond each in release,
        // a few in a debug build. The fastest of many reads is checked, so a
        // busy machine does not fail the test but a per-byte allocation would.
        let pid = getpid()
        var fastest = Double.infinity
        for _ in 0..<200 {
            let start = Memwriter.now()
            _ = try ProcessMaps.read(pid: pid)
            fastest = min(fastest, Memwriter.now() - start)
        }
        #expect(fastest < 0.002, "reading our own maps took \(fastest * 1e3) ms at best")
    }
}
