//! STUB (replaced by the prims branch)
use std::collections::VecDeque;
use std::io;
#[derive(Default)]
pub struct Buffer {
    d: VecDeque<u8>,
    r: Vec<u8>,
}
impl Buffer {
    pub fn new() -> Buffer {
        Buffer::default()
    }
    pub fn len(&self) -> usize {
        self.d.len()
    }
    pub fn is_empty(&self) -> bool {
        self.d.is_empty()
    }
    pub fn chunk_count(&self) -> usize {
        0
    }
    pub fn append(&mut self, data: &[u8]) {
        self.d.extend(data)
    }
    pub fn drain(&mut self, n: usize) {
        let n = n.min(self.d.len());
        self.d.drain(..n);
    }
    pub fn clear(&mut self) {
        self.d.clear()
    }
    pub fn first_slice(&self) -> &[u8] {
        self.d.as_slices().0
    }
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let (a, b) = self.d.as_slices();
        [a, b].into_iter()
    }
    pub fn copy_out(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.d.len());
        for (i, b) in self.d.iter().take(n).enumerate() {
            dst[i] = *b;
        }
        n
    }
    pub fn remove(&mut self, dst: &mut [u8]) -> usize {
        let n = self.copy_out(dst);
        self.drain(n);
        n
    }
    pub fn move_all_to(&mut self, dst: &mut Buffer) {
        dst.d.extend(self.d.drain(..));
    }
    pub fn move_to(&mut self, dst: &mut Buffer, n: usize) {
        let n = n.min(self.d.len());
        dst.d.extend(self.d.drain(..n));
    }
    pub fn pullup(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.d.len() < n {
            return None;
        }
        Some(&mut self.d.make_contiguous()[..n])
    }
    pub fn reserve(&mut self, n: usize) -> &mut [u8] {
        self.r = vec![0; n.max(32 * 1024)];
        &mut self.r
    }
    pub fn commit(&mut self, n: usize) {
        let r = std::mem::take(&mut self.r);
        self.d.extend(&r[..n]);
    }
    pub fn tail_room(&self) -> usize {
        0
    }
    pub fn read_from<R: io::Read>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        let mut b = vec![0; max.min(256 * 1024)];
        let n = r.read(&mut b)?;
        self.d.extend(&b[..n]);
        Ok(n)
    }
    pub fn write_to<W: io::Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let n = w.write(self.d.make_contiguous())?;
        self.drain(n);
        Ok(n)
    }
}
