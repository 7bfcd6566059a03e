import numpy as np, os, io
from PIL import Image
root='/tmp/probe_eval/imgs'
rng=np.random.default_rng(0)
kinds=[]
for split in ['train','test']:
    for c in range(10):
        d=f'{root}/{split}/{c}'; os.makedirs(d,exist_ok=True)
        for i in range(8 if split=='train' else 1):
            Image.fromarray(rng.integers(0,255,(20,20,3),dtype=np.uint8)).save(f'{d}/r{i}.png')
t=f'{root}/test'
Image.fromarray(rng.integers(0,255,(40,30),dtype=np.uint8),'L').save(f'{t}/0/gray.png')
Image.fromarray(rng.integers(0,255,(40,30,4),dtype=np.uint8),'RGBA').save(f'{t}/1/rgba.png')
Image.fromarray(rng.integers(0,65535,(40,30),dtype=np.uint16)).save(f'{t}/2/g16.png')
print(Image.open(f'{t}/2/g16.png').mode)
Image.fromarray(rng.integers(0,255,(40,30,4),dtype=np.uint8),'CMYK').save(f'{t}/3/cmyk.jpg')
im=Image.fromarray(rng.integers(0,255,(40,30,3),dtype=np.uint8)); ex=im.getexif(); ex[0x0112]=6; im.save(f'{t}/4/exif.jpg',exif=ex)
Image.fromarray(np.zeros((1,1,3),np.uint8)).save(f'{t}/5/tiny.png')
Image.fromarray(rng.integers(0,255,(4000,3000,3),dtype=np.uint8)).save(f'{t}/6/huge.png')
Image.fromarray(rng.integers(0,255,(40,30),dtype=np.uint8),'L').convert('P').save(f'{t}/7/pal.gif')
Image.fromarray(rng.integers(0,255,(40,30),dtype=np.uint8),'L').convert('1').save(f'{t}/8/bw.bmp')
Image.fromarray(rng.random((40,30),dtype=np.float32),'F').save(f'{t}/9/f.tiff')
